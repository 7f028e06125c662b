"""The objects every estimator and model agree on.

State is a tuple of tensors. A batch is a dict of tensors that the model itself prepares (``prepare_batch``, or
``make_batch`` for a model that makes its own data), so an estimator never needs to know what is inside it.

Models: every model is a :class:`Model`; estimators that need more ask for one of its refinements
(:class:`EquilibriumModel`, ...), through their ``requires``. Members that only some models have are small
protocols of their own (:class:`SyntheticData`, :class:`DeclaresNonconservative`, :class:`NamedState`), so the
core never looks a member up by name: everything it reads is declared here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ep_core.config import Config
from ep_core.errors import ConfigError, DivergenceError, EpxError, FileFormatError

__all__ = ["Batch", "Batchable", "CachesParameterTerms", "Capturable", "ChoosesBackwardRules", "DataSpec", "Dataset",
           "DeclaresConservative", "DeclaresNonconservative", "DivergenceError", "Dynamics", "EpxError", "Equilibrium",
           "EquilibriumModel", "EstimateStats", "Estimator", "ForceHomogeneous", "GradientEstimate", "HasMetrics",
           "HasTrainingDefaults", "LocalModel", "Model", "NamedState", "ResidualModel", "SplitsForce", "StacksKnobs",
           "StacksNudge", "StacksStepSize", "State", "StatefulEstimator", "SyntheticData", "matching_state"]

State = tuple[torch.Tensor, ...]
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Dynamics:
    """Step size and free-phase length: they define the fixed point, so every estimator shares them; and the
    fixed-point solver of the free and nudged phases (``ep_core.solvers``): ``plain`` iterates G exactly T1 (T2)
    times, ``anderson`` accelerates it until the relative residual is at most ``tol`` (or within the state's
    resolution), with at most T1 (T2) force evaluations and a history of ``memory`` iterates."""

    eps: float
    T1: int
    solver: str = "plain"
    tol: float = 1e-6
    memory: int = 5


DATA_KINDS = ("images", "text", "synthetic")


def _no_settings(dataset: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class DataSpec:
    """What a model learns from, as a typed class attribute ``data`` of the model.

    ``kind``: "images" (a dataset of B×C×H×W images and labels), "text" (windows of token ids) or "synthetic"
    (the model makes its own batches, :class:`SyntheticData`). ``shape(config)``: the shape of one sample the
    model accepts with that config (C, H, W for images; (context,) for text: the window length a batch needs).
    ``datasets``: the real datasets ``--data auto`` tries, in order, before the generated ``sample`` (which is
    made in ``shape``). ``batch_size``: the default. ``from_data(dataset)``: config values the data imply
    (lm's vocabulary), applied under the user's own settings. ``normalize``: image inputs are standardised per
    channel, (x − mean) / std, with the dataset's published training-set statistics (its ``normalization``), as
    seed 004's ``transforms.Normalize`` does; otherwise, and for a dataset without statistics (the generated
    sample), they stay in [0, 1].
    """

    kind: str
    shape: Callable[[Any], tuple[int, ...]] | None = None
    datasets: tuple[str, ...] = ()
    batch_size: int = 32
    from_data: Callable[[Any], Mapping[str, Any]] = _no_settings
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError("data", f"unknown data kind {self.kind!r}; valid kinds: {', '.join(DATA_KINDS)}")
        if self.kind != "synthetic" and self.shape is None:
            raise ConfigError("data", f"a model that learns from {self.kind} declares the shape of a sample")

    def sample_shape(self, config: Any) -> tuple[int, ...]:
        if self.shape is None:
            raise ConfigError("data", "a model that makes its own data has no sample shape")
        return tuple(self.shape(config))

    def config_from_data(self, dataset: Any | None) -> dict[str, Any]:
        return {} if dataset is None else dict(self.from_data(dataset))

    def check_tokens(self, model: str, config: Any, inputs: torch.Tensor, targets: torch.Tensor, *,
                     vocab: int) -> None:
        """A ConfigError unless ``inputs`` and ``targets`` are (B, T) token ids below ``vocab``, T at most the
        context ``config`` gives the model."""
        context = self.sample_shape(config)[0]
        if inputs.dim() != 2 or inputs.shape != targets.shape or inputs.shape[1] > context:
            raise ConfigError("context", f"{model} expects (B, T) token ids with T <= context={context} and targets "
                                         f"of the same shape, got {tuple(inputs.shape)} and {tuple(targets.shape)}")
        largest = max(int(inputs.max()), int(targets.max()))
        if largest >= vocab:
            raise ConfigError("vocab", f"token id {largest} does not fit vocab={vocab}; leave vocab unset to take "
                                       "it from the dataset")

    def check_images(self, model: str, config: Any, inputs: torch.Tensor) -> None:
        """A ConfigError unless ``inputs`` is a batch of images of the shape ``config`` makes the model take."""
        expected = self.sample_shape(config)
        if inputs.dim() != 1 + len(expected) or tuple(inputs.shape[1:]) != expected:
            raise ConfigError("image", f"{model} expects images of shape (B, {', '.join(map(str, expected))}), got "
                                       f"{tuple(inputs.shape)}; change --model-set image/channels to match the data")


@runtime_checkable
class Model(Protocol):
    """What every estimator, the harness, training and the kit rely on.

    ``loss(batch)`` is the scalar training objective as a differentiable function of the parameters (mean over the
    batch): the reference gradient is its autograd. For an :class:`EquilibriumModel` it is the free phase unrolled
    for T1 steps, then C(x_T1) (:func:`ep_core.relax.unrolled_loss`). ``prepare_batch`` turns the inputs and
    targets a dataset of ``data.kind`` gives into the model's batch (e.g. masking); a model whose
    ``data.kind`` is "synthetic" makes its own (:class:`SyntheticData`) and may leave it unused.
    """

    config: Config
    data: ClassVar[DataSpec]

    def loss(self, batch: Batch) -> torch.Tensor: ...

    def parameter_groups(self) -> dict[str, list[str]]: ...

    def prepare_batch(self, inputs: torch.Tensor, targets: torch.Tensor, *, generator: torch.Generator) -> Batch: ...


@runtime_checkable
class SyntheticData(Protocol):
    """A model that makes its own batches (``data.kind == "synthetic"``)."""

    def make_batch(self, size: int, *, generator: torch.Generator) -> Batch: ...


@runtime_checkable
class EquilibriumModel(Model, Protocol):
    """A dynamical system x' = F(x; θ, u) whose stationary state is the model's output.

    The relaxation map is G(x) = Π(x + ε F(x)); the free phase iterates G for T1 steps from ``init_state``.
    ``dynamics`` (ε and T1) define the fixed point, so they live on the model and every estimator in one
    comparison shares them.
    """

    @property
    def dynamics(self) -> Dynamics: ...

    def init_state(self, batch: Batch) -> State: ...

    def force(self, state: State, batch: Batch) -> State: ...

    def project(self, state: State) -> State: ...

    def cost(self, state: State, batch: Batch) -> torch.Tensor: ...


@runtime_checkable
class ResidualModel(Model, Protocol):
    """A feed-forward residual network: h_0 = embed(x), h_{l+1} = h_l + f_l(h_l) for the residual branches f_l
    (``branches()``, in order), logits = readout(h_L) (the final norm and head); ``width`` is d, the width of every
    h_l, and ``classes`` the number of logits. ``forward_hidden(batch)`` gives (h_0 … h_L, logits) in one forward
    pass; ``batch["inputs"]`` is what ``embed`` takes and ``batch["labels"]`` the int64 targets.

    The branches are a method, not a data member: a submodule lives in the Module's ``_modules``, where Python
    3.12's protocol checks (``inspect.getattr_static``) do not look, so a ``blocks`` attribute in the protocol would
    make no model a ResidualModel there. The same holds for every protocol here: parameters, buffers and submodules
    are reached through methods."""

    width: int
    classes: int

    def branches(self) -> torch.nn.ModuleList: ...

    def embed(self, inputs: torch.Tensor) -> torch.Tensor: ...

    def readout(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def forward_hidden(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]: ...


@runtime_checkable
class LocalModel(Model, Protocol):
    """A feed-forward network built from :mod:`ep_core.local` layers, whose backward pass the estimator chooses:
    ``local_loss(batch, rules)`` is the loss computed under ``rules`` (an :class:`ep_core.local.BackwardRules`:
    feedback matrices by Linear name, a backward rule by LayerNorm name), so ``loss(batch)`` is
    ``local_loss(batch, EXACT)``; ``local_layers()`` gives its local layers by name (``blocks.0.ln_1``), in
    module order. The model is never changed by the rules."""

    def local_loss(self, batch: Batch, rules: Any) -> torch.Tensor: ...

    def local_layers(self) -> Mapping[str, torch.nn.Module]: ...


@runtime_checkable
class CachesParameterTerms(Protocol):
    """An equilibrium model whose force uses a term of the parameters alone that is costly to compute (lm's gain
    bound κ, an eigenvalue problem): ``with_parameter_terms(batch)`` is the batch carrying that term, computed once
    (with its autograd graph when grad is on), so that an unrolled free phase computes it once, not at every
    step. ``parameter_term_inputs()`` is what the term needs that a CUDA graph cannot record (lm: the top
    eigenvector, since an eigendecomposition reads its status back): computed eagerly before each replay of a
    captured estimate and passed in with the batch, from which ``with_parameter_terms`` then computes the term
    with recordable, differentiable operations."""

    def parameter_term_inputs(self) -> Batch: ...

    def with_parameter_terms(self, batch: Batch) -> Batch: ...


@runtime_checkable
class Capturable(Protocol):
    """An estimator whose estimate on ``model`` can be recorded once as a CUDA graph and replayed
    (:mod:`ep_core.capture`): a fixed amount of device work whatever the data (no stopping on a tolerance), no
    random draws, and no tensor read back except through ``ep_core.capture.finite`` and ``report``.
    ``capturable(model)`` says whether that holds for this model and configuration."""

    def capturable(self, model: Any) -> bool: ...


@runtime_checkable
class Batchable(Protocol):
    """An estimator whose estimate treats problems independently, so that N problems of one configuration (seeds,
    grid points) can run as one stacked model (:mod:`ep_core.batching`): it reduces over the whole state or batch
    only through the model's cost and the free phase's residual (which the stack recomputes per problem), draws
    nothing at random, and its stats do not depend on the data. ``batchable(model)`` says whether that holds for
    this model and configuration."""

    def batchable(self, model: Any) -> bool: ...


@runtime_checkable
class StacksNudge(Protocol):
    """A :class:`Batchable` estimator whose nudge strength (the configuration field ``nudge_field``, β) enters
    only as β·C in the nudged dynamics and as the 1/β of the contrast, with the rest of the estimate linear in the
    cost: on a model whose cost is w·C its estimate at β is w times its estimate at w·β. Problems that differ only
    in β then stack (:mod:`ep_core.batching`): the stack runs at the first member's β₀, member i's cost weighted
    by u_i = β_i/β₀, and member i's estimate divided by u_i."""

    nudge_field: ClassVar[str]


@runtime_checkable
class ForceHomogeneous(Protocol):
    """A :class:`Batchable` estimator that uses the force only through relaxation steps x ← Π(x + εΦ) whose field
    Φ is linear in F and C together (the nudge −β∇ₓC, a correction in F's Jacobian) and through pairings
    linear in F and C: on a model whose force and cost are v·F and v·C, relaxed at step ε/v, its estimate is v
    times its estimate at ε. Problems whose models differ only in their step size (:class:`StacksStepSize`) then
    stack (:mod:`ep_core.batching`): the stack runs at the first member's ε₀, member i's force and cost scaled by
    v_i = ε_i/ε₀, and member i's estimate divided by v_i. ``force_homogeneous = True`` declares it."""

    force_homogeneous: ClassVar[bool]


@runtime_checkable
class StacksStepSize(Protocol):
    """A model whose configuration field ``step_size_field`` is its dynamics' step size ε and enters nothing else
    (no buffer, no branch), so that models differing only in ε stack for a :class:`ForceHomogeneous` estimator:
    a sweep's grid points over ε are measured together like its seeds."""

    step_size_field: ClassVar[str]


@runtime_checkable
class StacksKnobs(Protocol):
    """A model that reads the continuous knobs ``stacked_knobs`` (configuration fields) from buffers of its own,
    made from its configuration, so that models differing only in those knobs run as one stacked model
    (:mod:`ep_core.batching`), each member with its own values: a sweep's grid points over such a knob are measured
    together like its seeds. Models stack only where each knob is zero in all of them or in none, since a model may
    skip the work a zero knob multiplies (lm and cet skip the attention at s = 0)."""

    stacked_knobs: ClassVar[tuple[str, ...]]


@runtime_checkable
class HasTrainingDefaults(Protocol):
    """A model with its own defaults for `epx train` (TrainConfig fields), applied under the user's settings."""

    training_defaults: ClassVar[Mapping[str, Any]]


@runtime_checkable
class HasMetrics(Protocol):
    """A model with task metrics (accuracy, ...) on a batch, for training and reports."""

    def metrics(self, batch: Batch) -> dict[str, float]: ...


@runtime_checkable
class DeclaresNonconservative(Protocol):
    """An equilibrium model that names the part N of its force that is not a gradient (F = −∇E + N), so that aep
    linearises only N."""

    def nonconservative(self, state: State, batch: Batch) -> State: ...


@runtime_checkable
class SplitsForce(DeclaresNonconservative, Protocol):
    """A model whose force computes its non-conservative part on the way (lm, cet: F = [conservative] + N), and
    returns both from one evaluation, so that aep's nudged step, which needs F(x) and N(x), evaluates N once."""

    def split_force(self, state: State, batch: Batch) -> tuple[State, State]: ...


@runtime_checkable
class DeclaresConservative(DeclaresNonconservative, Protocol):
    """A model that evaluates its gradient part F − N = −∇E without N (lm: x_in − (1 + s·c)·z; cet: all but the
    attention), so that aep's uncapped nudged field, F(x) − (N(x) − N(x*)) + J_Nᵀv − σβ∇ₓC, written as
    −∇E(x) + N(x*) + J_Nᵀv − σβ∇ₓC, evaluates no N, and no attention, at a nudged step."""

    def conservative(self, state: State, batch: Batch) -> State: ...


@runtime_checkable
class DifferentiatesCost(Protocol):
    """An equilibrium model that computes g = ∇ₓC(x) itself, equal to reverse mode through ``cost`` (lm: the
    read-out's softmax and normalisation written out). Every nudged step needs g, and reverse mode pays a graph
    and autograd's per-call overhead each time: on lm about twice the arithmetic. Called without grad mode; the
    result is not differentiated."""

    def cost_gradient(self, state: State, batch: Batch) -> State: ...


@runtime_checkable
class Dataset(Protocol):
    """A dataset a registered factory returns: its ``name``, the ``kind`` of model data it serves ("images" or
    "text", as in :class:`DataSpec`), its size and a JSON-ready ``describe()`` for results. Images batch as
    ``batch(size, *, generator, dtype) -> (B×C×H×W in [0, 1], int64 labels)``, text as ``batch(size, *, context,
    generator) -> (inputs, targets)`` of token ids (see ep_core.datasets.images.ImageDataset and
    ep_core.datasets.text.TextDataset)."""

    name: str
    kind: ClassVar[str]

    def __len__(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class NamedState(Protocol):
    """A model with a name for each tensor of its state, for reports."""

    state_names: ClassVar[tuple[str, ...]]


@dataclass(frozen=True)
class Equilibrium:
    """The end point x* of a free phase: its state, its residual r = ||G(x*) − x*|| / ||x*||, the steps taken."""

    state: State
    residual: float
    steps: int


@dataclass(frozen=True)
class EstimateStats:
    """How an estimate was obtained, beyond its equilibrium: typed fields holding numbers. The base has none; an
    estimator that counts something of its own subclasses it (adjoint: ``AdjointStats(vjp_evals,
    adjoint_residual)``), so that reports and the kit know every field's name and type."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class GradientEstimate:
    """What an estimator returns: one gradient per named parameter, the free phase's :class:`Equilibrium` when
    there is one, and its :class:`EstimateStats`."""

    grads: dict[str, torch.Tensor]
    equilibrium: Equilibrium | None = None
    stats: EstimateStats = field(default_factory=EstimateStats)

    def __post_init__(self) -> None:
        # A plugin bug, named where it is made rather than where a report later reads the field.
        if not isinstance(self.stats, EstimateStats):
            raise TypeError(f"GradientEstimate.stats must be an EstimateStats dataclass, got "
                            f"{type(self.stats).__name__}: subclass ep_core.protocols.EstimateStats with typed fields")
        if self.equilibrium is not None and not isinstance(self.equilibrium, Equilibrium):
            raise TypeError(f"GradientEstimate.equilibrium must be an Equilibrium or None, got "
                            f"{type(self.equilibrium).__name__}")


class Estimator(Protocol):
    """An estimator: a small object with one job, built from its validated config."""

    name: ClassVar[str]
    Config: ClassVar[type[Config]]
    requires: ClassVar[type]
    exact_limit: ClassVar[str]
    conformance_limit: ClassVar[str | None]
    """What ep_core.testing samples to check exactness: "conservative", "any-stable" or None. Optional class
    attributes: ``limit_settings`` (config changes that move the estimator to its exact limit, for the kit),
    ``properties`` (functions ``(estimator, model, batch, seed)`` that raise AssertionError when a property the
    estimator promises does not hold; the kit runs them) and ``summary`` (one line for ``epx list``)."""
    config: Config

    def estimate(self, model: Any, batch: Batch, *, generator: torch.Generator) -> GradientEstimate: ...


def matching_state(owner: str, expected: Mapping[str, torch.Tensor],
                   given: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``given`` as tensors on the dtype and device of ``expected``, once it has exactly its keys and shapes; a
    FileFormatError naming ``owner`` otherwise (a checkpoint of another model or estimator)."""
    if set(given) != set(expected):
        raise FileFormatError(f"{owner} state", f"has {sorted(given)}, expected {sorted(expected)}")
    for key, tensor in expected.items():
        value = given[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            raise FileFormatError(f"{owner} state", f"{key} is {getattr(value, 'shape', type(value).__name__)}, "
                                                    f"expected {tuple(tensor.shape)}")
    return {key: given[key].to(tensor) for key, tensor in expected.items()}


@runtime_checkable
class ChoosesBackwardRules(Protocol):
    """An estimator for a :class:`LocalModel` whose gradient is the model's ``local_loss`` differentiated under
    backward rules it chooses (fa): ``backward_rules(model)`` gives them, so that an analysis can run the same
    backward pass and watch it (``epx analyze layernorm``)."""

    def backward_rules(self, model: Any) -> Any: ...


@runtime_checkable
class StatefulEstimator(Protocol):
    """An estimator that keeps state between estimates (DFA's feedback matrices): built from the model and a
    generator, exposed as tensors, and given back the same way, so that checkpoints hold it and resume restores
    it."""

    def init(self, model: Any, *, generator: torch.Generator) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...
