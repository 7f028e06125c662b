"""Batched problems: N equilibrium models of one configuration, each with its own batch, run as one model.

:func:`stack` makes a model whose parameters, buffers, states and batch entries carry a leading problem axis of
length N, and whose methods are the members' own, vectorised over that axis (``torch.func.vmap`` of
``torch.func.functional_call``):

    F(x; θ)[i] = v_i F(x[i]; θ_i, batch[i]),   init_state and Π likewise,   C(x; θ) = Σ_i w_i C(x[i]; θ_i, batch[i]),

v_i = w_i = 1 but where the members differ in their step size or their estimators in their nudge (below).

The cost is a sum of the members' costs, so ∇ₓC[i] = w_i∇ₓC_i and ∂C/∂θ_i = w_i∂C_i/∂θ_i: an estimator that treats
problems independently (:class:`~ep_core.protocols.Batchable`: no reduction over the whole state but the
model's cost, no random draws) computes on the stack the N members' own estimates, in relaxations whose every
kernel does the work of N. On a GPU a small problem's step costs about its kernel launches, so N problems cost
little more than one (:class:`ep_core.capture.Runner` records the stack's estimate as one CUDA graph).

Members may differ in the continuous knobs their model reads from buffers (:class:`~ep_core.protocols.StacksKnobs`:
lm's and cet's attention scale s and damping c), which are stacked like any buffer, and in the nudge strength β of
an estimator that declares it (:class:`~ep_core.protocols.StacksNudge`): the stack runs at β₀ with member i's cost
weighted by u_i = β_i/β₀ (:func:`nudge_ratios`), which nudges member i by β_i. Models that differ in their step
size ε (:class:`~ep_core.protocols.StacksStepSize`) stack for an estimator whose estimate scales with the force
(:class:`~ep_core.protocols.ForceHomogeneous`): the stack steps by ε₀ with member i's force and cost scaled by
v_i = ε_i/ε₀, so member i moves by ε₀v_iF_i = ε_iF_i. Either way member i's estimate is w_i = u_i·v_i times its own
and :func:`split` divides it back. A sweep's grid points over s, c, β or ε run as one relaxation.

The one number of an estimate that reduces over the whole state, the free phase's residual ||G(x*) − x*|| / ||x*||,
is recomputed per member (:func:`member_residuals`); :func:`split` gives back the N members' estimates.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ep_core.protocols import (Batch, CachesParameterTerms, DeclaresConservative, DeclaresNonconservative,
                               DifferentiatesCost, Equilibrium, ForceHomogeneous, GradientEstimate, SplitsForce, State,
                               StacksKnobs, StacksNudge, StacksStepSize)

PROBLEMS = "problems"
"""The stack's submodule holding the stacked parameters and buffers: its names are the members' under this prefix."""


class Stacked(nn.Module):
    """N models of one type and configuration as one (module docstring). Built by :func:`stack`. ``config`` and
    ``dynamics`` are the first member's: the members' knobs (:class:`~ep_core.protocols.StacksKnobs`) are in the
    stacked buffers, their step sizes in the force weights."""

    def __init__(self, models: Sequence[nn.Module], nudge_ratios: Sequence[float] | None = None):
        super().__init__()
        base = models[0]
        self.problems = copy.deepcopy(base)
        with torch.no_grad():
            for name, parameter in base.named_parameters():
                owner, leaf = _owner(self.problems, name)
                owner._parameters[leaf] = nn.Parameter(torch.stack([m.get_parameter(name) for m in models]),
                                                       requires_grad=parameter.requires_grad)
            for name, _ in base.named_buffers():
                owner, leaf = _owner(self.problems, name)
                owner._buffers[leaf] = torch.stack([m.get_buffer(name) for m in models])
        self.members = list(models)
        self.config = base.config
        self.data = base.data
        self.step_ratios = step_ratios(models)
        """v_i = ε_i/ε₀, member i's force weight (None: all 1)."""
        self.cost_weights = _products(nudge_ratios, self.step_ratios)
        """w_i = u_i·v_i, member i's cost weight and the factor its estimate carries (None: all 1)."""
        # Made here, not in force() or cost(): a tensor made from Python numbers inside a CUDA graph capture is a
        # host copy.
        reference = next(base.parameters())

        def weights(values: list[float] | None) -> torch.Tensor | None:
            return None if values is None else torch.tensor(values, dtype=reference.dtype, device=reference.device)
        self._force_weights, self._cost_weights = weights(self.step_ratios), weights(self.cost_weights)

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(member, *args)`` for one member: what :meth:`_each` runs with that member's tensors swapped in."""
        return call(self.problems, *args)

    def _each(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(member_i, *args[i])`` for every member i, vectorised over the leading problem axis."""
        tensors = {**dict(self.named_parameters()), **dict(self.named_buffers())}

        def one(member_tensors: dict[str, torch.Tensor], *member_args: Any) -> Any:
            return torch.func.functional_call(self, member_tensors, (call, *member_args))
        # The fused attention kernels' batching rules break in the backward pass on CUDA ("LSE is not correctly
        # aligned", torch 2.11) and are a loop over the members on the CPU: where a pass may be differentiated, and
        # on the CPU, attention runs as its math decomposition, which batches as plain matrix products.
        fused = not torch.is_grad_enabled() and all(t.device.type == "cuda" for t in tensors.values())
        with contextlib.nullcontext() if fused else sdpa_kernel(SDPBackend.MATH):
            return torch.func.vmap(one)(tensors, *args)

    def batch(self, batches: Sequence[Batch]) -> Batch:
        """The members' batches as the stack's: stacked, each carrying its member's parameter-term inputs
        (:class:`~ep_core.protocols.CachesParameterTerms`), which cannot be computed under vmap."""
        return stack_batches(self._with_term_inputs(batches))

    def _with_term_inputs(self, batches: Sequence[Batch]) -> list[Batch]:
        return [{**batch, **m.parameter_term_inputs()} if isinstance(m, CachesParameterTerms) else batch
                for m, batch in zip(self.members, batches, strict=True)]

    def load(self, batches: Sequence[Batch], into: Batch) -> None:
        """Copy the members' current parameters and buffers into the stack's, and ``batches`` into the stacked
        batch ``into`` (made by :meth:`batch`): what a replayed graph reads, so that it sees in-place updates of
        the members."""
        with torch.no_grad():
            for name, stacked in (*self.named_parameters(), *self.named_buffers()):
                member_name = name.removeprefix(PROBLEMS + ".")
                torch.stack([_tensor(m, member_name) for m in self.members], out=stacked)
            complete = self._with_term_inputs(batches)
            for key, stacked in into.items():
                torch.stack([batch[key] for batch in complete], out=stacked)

    @property
    def dynamics(self):
        return self.problems.dynamics

    def parameter_groups(self) -> dict[str, list[str]]:
        return {group: [f"{PROBLEMS}.{name}" for name in names]
                for group, names in self.problems.parameter_groups().items()}

    def prepare_batch(self, inputs: torch.Tensor, targets: torch.Tensor, *, generator: torch.Generator) -> Batch:
        """Each member's batch from its slice of ``inputs`` and ``targets`` (problem axis first), as :meth:`batch`."""
        return self.batch([m.prepare_batch(i, t, generator=generator)
                           for m, i, t in zip(self.members, inputs, targets, strict=True)])

    def init_state(self, batch: Batch) -> State:
        return self._each(lambda model, b: model.init_state(b), batch)

    def force(self, state: State, batch: Batch) -> State:
        return self._scaled(self._each(lambda model, x, b: model.force(x, b), state, batch))

    def project(self, state: State) -> State:
        return self._each(lambda model, x: model.project(x), state)

    def cost(self, state: State, batch: Batch) -> torch.Tensor:
        return self._weighted(self._each(lambda model, x, b: model.cost(x, b), state, batch))

    def loss(self, batch: Batch) -> torch.Tensor:
        return self._weighted(self._each(lambda model, b: model.loss(b), batch))

    def _weighted(self, costs: torch.Tensor) -> torch.Tensor:
        return costs.sum() if self._cost_weights is None else (costs * self._cost_weights).sum()

    def _scaled(self, parts: State) -> State:
        """v_i times member i's part of a force."""
        return _per_member(parts, self._force_weights)


class _Nonconservative:
    def nonconservative(self, state: State, batch: Batch) -> State:
        """v_i N_i: the part of the stack's force v_i F_i = −∇(v_i E_i) + v_i N_i that is not a gradient."""
        return self._scaled(self._each(lambda model, x, b: model.nonconservative(x, b), state, batch))


class _SplitsForce(_Nonconservative):
    def split_force(self, state: State, batch: Batch) -> tuple[State, State]:
        """(v_i F_i, v_i N_i) from one evaluation of each member's."""
        forces, parts = self._each(lambda model, x, b: model.split_force(x, b), state, batch)
        return self._scaled(forces), self._scaled(parts)


class _Conservative:
    def conservative(self, state: State, batch: Batch) -> State:
        """v_i (F_i − N_i), the stack's gradient part, from each member's own."""
        return self._scaled(self._each(lambda model, x, b: model.conservative(x, b), state, batch))


class _CostGradient:
    def cost_gradient(self, state: State, batch: Batch) -> State:
        """w_i ∇C_i, the gradient of the stack's cost Σ_i w_i C_i, from each member's own."""
        return _per_member(self._each(lambda model, x, b: model.cost_gradient(x, b), state, batch), self._cost_weights)


class _ParameterTerms:
    def parameter_term_inputs(self) -> Batch:
        """The members' own, stacked: the stack's parameters are theirs (:meth:`Stacked.load`), and what these
        inputs hold (lm: an eigenvector) cannot be computed under vmap."""
        return stack_batches([m.parameter_term_inputs() for m in self.members])

    def with_parameter_terms(self, batch: Batch) -> Batch:
        return self._each(lambda model, b: model.with_parameter_terms(b), batch)


@functools.cache
def _stacked_class(model_type: type) -> type[Stacked]:
    """Stacked with the optional members the members' type declares, so that the stack satisfies the same
    protocols (:class:`DeclaresNonconservative`, :class:`SplitsForce`, :class:`DeclaresConservative`,
    :class:`CachesParameterTerms`, :class:`DifferentiatesCost`) and estimators treat it alike."""
    nonconservative = _SplitsForce if issubclass(model_type, SplitsForce) else _Nonconservative
    mixins = [mixin for protocol, mixin in ((DeclaresNonconservative, nonconservative),
                                            (DeclaresConservative, _Conservative),
                                            (CachesParameterTerms, _ParameterTerms),
                                            (DifferentiatesCost, _CostGradient))
              if issubclass(model_type, protocol)]
    return type(f"Stacked{model_type.__name__}", (*mixins, Stacked), {})


def stack(models: Sequence[nn.Module], nudge_ratios: Sequence[float] | None = None) -> Stacked:
    """The N models as one (module docstring). They must share a type, a configuration (but for the knobs they
    read from buffers and their step size, :func:`stacking_key`) and parameter shapes. ``nudge_ratios``
    (:func:`nudge_ratios`) weight the members' costs."""
    if not models:
        raise ValueError("stack needs at least one model")
    base = models[0]
    key, shapes = stacking_key(base), _shapes(base)
    for model in models[1:]:
        if stacking_key(model) != key or _shapes(model) != shapes:
            raise ValueError("stacked models must share a type, a configuration (but for the knobs they declare in "
                             "stacked_knobs and their step_size_field) and parameter shapes")
    if nudge_ratios is not None and len(nudge_ratios) != len(models):
        raise ValueError(f"{len(models)} models need as many nudge ratios, got {len(nudge_ratios)}")
    return _stacked_class(type(base))(models, nudge_ratios)


def stacking_key(model: nn.Module, *, step_size: bool = True) -> tuple:
    """What models must share to be stacked: their type and configuration, less the knobs they read from buffers
    (:class:`~ep_core.protocols.StacksKnobs`), of which only whether each is zero, and, with ``step_size``, less
    the step size of a model that declares it (:class:`~ep_core.protocols.StacksStepSize`). The stack runs each
    member at its own step size; only a :class:`~ep_core.protocols.ForceHomogeneous` estimator's estimate of it is
    each member's own (:func:`stacks_step_size`)."""
    knobs = type(model).stacked_knobs if isinstance(model, StacksKnobs) else ()
    free = {type(model).step_size_field} if step_size and isinstance(model, StacksStepSize) else set()
    return (*_config_key(model, {*knobs, *free}), tuple(getattr(model.config, knob) == 0 for knob in knobs))


def _config_key(owner: Any, excluded: set[str]) -> tuple:
    """The owner's type and its configuration's (name, value) pairs, less the ``excluded`` fields."""
    config = owner.config
    return type(owner), tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                              if f.name not in excluded)


def _ratios(values: Sequence[float]) -> list[float] | None:
    """The values relative to the first one; None when they are all equal."""
    return None if len(set(values)) == 1 else [value / values[0] for value in values]


def stacks_step_size(estimator: Any) -> bool:
    """Whether an estimator (or its class) declares that its estimate scales with the force
    (:class:`~ep_core.protocols.ForceHomogeneous`), so that models differing in their step size stack for it."""
    return isinstance(estimator, ForceHomogeneous) and estimator.force_homogeneous is True


def step_ratios(models: Sequence[nn.Module]) -> list[float] | None:
    """v_i = ε_i/ε₀, the members' step sizes relative to the first one's; None when they share it."""
    return _ratios([model.dynamics.eps for model in models])


def _per_member(parts: State, weights: torch.Tensor | None) -> State:
    """Member i's part of each state tensor (problem axis first) times ``weights[i]``; None: unchanged."""
    if weights is None:
        return parts
    return tuple(part * weights.view(-1, *(1,) * (part.dim() - 1)) for part in parts)


def _products(first: Sequence[float] | None, second: Sequence[float] | None) -> list[float] | None:
    """The elementwise product of two weight lists, where None means all 1."""
    if first is None:
        return None if second is None else list(second)
    if second is None:
        return list(first)
    return [a * b for a, b in zip(first, second, strict=True)]


KNOB = "knob_"
"""The prefix of the buffers that hold a model's stacked knobs (:func:`register_knobs`)."""


def register_knobs(model: nn.Module) -> None:
    """A buffer ``knob_<name>`` for each of the model's ``stacked_knobs``, made from its configuration: float64, so
    that a model moved to float64 holds the value exactly, and not saved with the parameters (the configuration
    is)."""
    for name in type(model).stacked_knobs:
        model.register_buffer(KNOB + name, torch.tensor(float(getattr(model.config, name)), dtype=torch.float64),
                              persistent=False)


def knob(model: nn.Module, name: str, like: torch.Tensor) -> torch.Tensor:
    """The model's knob ``name`` (:func:`register_knobs`) in the dtype of ``like``: under a stack, its member's."""
    return model.get_buffer(KNOB + name).to(like.dtype)


def estimator_key(estimator: Any) -> tuple:
    """What the estimators of stacked problems must share: their type and configuration, less the nudge strength
    of an estimator that stacks it (:class:`~ep_core.protocols.StacksNudge`)."""
    return _config_key(estimator, {type(estimator).nudge_field} if isinstance(estimator, StacksNudge) else set())


def nudge_ratios(estimators: Sequence[Any]) -> list[float] | None:
    """u_i = β_i / β₀ for estimators that differ only in their nudge (:class:`~ep_core.protocols.StacksNudge`),
    the stack running at the first one's β₀; None when they share it."""
    first = estimators[0]
    if not isinstance(first, StacksNudge):
        return None
    field = type(first).nudge_field
    return _ratios([getattr(estimator.config, field) for estimator in estimators])


def stackable(batches: Sequence[Batch]) -> bool:
    """Whether the batches stack: the same keys, every value a tensor of one shape, dtype and device."""
    first = batches[0]
    return all(batch.keys() == first.keys() and all(
        isinstance(batch[key], torch.Tensor) and isinstance(first[key], torch.Tensor)
        and (batch[key].shape, batch[key].dtype, batch[key].device) == (first[key].shape, first[key].dtype,
                                                                          first[key].device)
        for key in first) for batch in batches)


def stack_batches(batches: Sequence[Batch]) -> Batch:
    if not stackable(batches):
        raise ValueError("batches stack only with the same keys and tensors of one shape, dtype and device")
    return {key: torch.stack([batch[key] for batch in batches]) for key in batches[0]}


def member_residuals(model: Stacked, batch: Batch, state: State) -> torch.Tensor:
    """r_i = ||G(x[i]) − x[i]|| / ||x[i]|| for each member i (one batched force evaluation): a vector of N."""
    with torch.no_grad():
        if isinstance(model, CachesParameterTerms):
            batch = model.with_parameter_terms(batch)
        eps = model.dynamics.eps
        moved = model.project(tuple(torch.add(x, f, alpha=eps) for x, f in zip(state, model.force(state, batch))))

        def squares(parts: State) -> torch.Tensor:
            return sum(part.reshape(part.shape[0], -1).pow(2).sum(dim=1) for part in parts)
        size = squares(state).sqrt().clamp_min(torch.finfo(state[0].dtype).tiny)
        return squares(tuple(m - x for m, x in zip(moved, state))).sqrt() / size


def split(estimate: GradientEstimate, residuals: Sequence[Any],
          cost_weights: Sequence[float] | None = None) -> list[GradientEstimate]:
    """The members' estimates from the stack's, with their own free-phase residuals; with ``cost_weights`` (the
    stack's), member i's divided by w_i (module docstring)."""
    estimates = []
    for i, residual in enumerate(residuals):
        grads = {name.removeprefix(PROBLEMS + "."): g[i] for name, g in estimate.grads.items()}
        if cost_weights is not None:
            grads = {name: g / cost_weights[i] for name, g in grads.items()}
        found = estimate.equilibrium
        equilibrium = None if found is None else Equilibrium(state=tuple(t[i] for t in found.state),
                                                             residual=residual, steps=found.steps)
        estimates.append(GradientEstimate(grads=grads, equilibrium=equilibrium, stats=estimate.stats))
    return estimates


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, leaf = _owner(module, name)
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _shapes(model: nn.Module) -> tuple:
    return tuple((name, t.shape, t.dtype, t.device) for name, t in (*model.named_parameters(),
                                                                     *model.named_buffers()))
