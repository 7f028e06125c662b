"""Hypothesis strategies for epx: small random problems on which estimators can be checked.

    from hypothesis import given, strategies as st
    from ep_core.testing.strategies import batches, configs, models, seeds

    @given(models(conservative=False), seeds())
    def test_my_rule(problem, seed):
        model, batch = problem
        ...

    @given(st.data())
    def test_any_config(data):
        config = data.draw(configs(MyRule))          # any config inside the declared ranges
        problem = data.draw(models())
        batch = data.draw(batches(problem.model))    # another batch for the same model

Every strategy takes keyword arguments only.

A drawn :class:`ToyProblem` prints as the call that rebuilds it (``make_toy_problem(...)``; also
``problem.rebuild()``), so a failing example that Hypothesis reports can be reproduced outside Hypothesis.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from hypothesis import strategies as st

from ep_core.config import Config
from ep_core.models.localgpt import LocalGPT, LocalGPTConfig
from ep_core.models.resmlp import ResMLP, ResMLPConfig
from ep_core.models.toy import Toy, ToyConfig
from ep_core.protocols import Batch, EquilibriumModel, SyntheticData

T1 = 300
"""Free-phase steps at ``EPS``. At a toy's fixed point every eigenvalue of J = ∂F/∂x has real part at most
−(1 − coupling), so with coupling ≤ 0.7 and ε = 0.2 the relaxation contracts by at most ≈ 0.94 per step (the
worst of 300 random toys: 0.938, whose free-phase residual fell below 1e-12 within 300 steps)."""
EPS = 0.2


@dataclass(frozen=True, repr=False, eq=False)
class Problem:
    """A model and a batch for it, plus the config and seeds that rebuild both (``make``)."""

    model: Any
    batch: Batch
    config: Any
    init_seed: int
    batch_size: int
    batch_seed: int
    dtype: torch.dtype = torch.float64

    make: ClassVar[Callable[..., Problem]]
    """The function that built it: ``make(config, init_seed=, batch_size=, batch_seed=, dtype=)``."""
    conservative: ClassVar[bool | None] = None
    """Whether the model is conservative (a toy's config says; other models have no such notion)."""

    def __iter__(self):
        """``model, batch = problem``."""
        return iter((self.model, self.batch))

    def __repr__(self) -> str:
        return (f"{self.make.__name__}({self.config!r}, init_seed={self.init_seed}, "
                f"batch_size={self.batch_size}, batch_seed={self.batch_seed}, dtype={self.dtype})")

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # how Hypothesis prints a falsifying example
        printer.text(repr(self))

    def rebuild(self) -> Problem:
        """A fresh, identical copy (new parameter tensors), e.g. to reproduce a failure outside Hypothesis."""
        return self.make(self.config, init_seed=self.init_seed, batch_size=self.batch_size,
                         batch_seed=self.batch_seed, dtype=self.dtype)


class ToyProblem(Problem):
    """A toy model (:class:`Toy`) and a batch it made."""

    @property
    def conservative(self) -> bool:
        return self.config.conservative


def make_toy_problem(config: ToyConfig, *, init_seed: int, batch_size: int, batch_seed: int,
                     dtype: torch.dtype = torch.float64) -> ToyProblem:
    """The toy (parameters from ``init_seed``) and its batch (from ``batch_seed``), deterministically."""
    model = Toy(config, generator=torch.Generator().manual_seed(init_seed)).to(dtype=dtype)
    batch = model.make_batch(batch_size, generator=torch.Generator().manual_seed(batch_seed))
    return ToyProblem(model, batch, config, init_seed, batch_size, batch_seed, dtype)


ToyProblem.make = staticmethod(make_toy_problem)


SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator.manual_seed``."""
    return SEEDS


@st.composite
def toy_configs(draw: st.DrawFn, conservative: bool | None = None, *, T1: int = T1, eps: float = EPS,
                max_units: int = 8, max_coupling: float = 0.7) -> ToyConfig:
    """A :class:`ToyConfig`: 3–8 units, 1–4 inputs, 1–min(3, units) outputs, coupling in [0.05, 0.7].

    ``conservative=None`` draws both kinds. The default ``T1`` and ``eps`` converge for every drawn coupling.
    """
    units = draw(st.integers(3, max_units))
    return ToyConfig(
        units=units,
        inputs=draw(st.integers(1, 4)),
        outputs=draw(st.integers(1, min(3, units))),
        conservative=draw(st.booleans()) if conservative is None else conservative,
        coupling=draw(st.floats(0.05, max_coupling)),
        eps=eps,
        T1=T1,
    )


@st.composite
def toy_models(draw: st.DrawFn, conservative: bool | None = None, *, T1: int = T1, eps: float = EPS,
               max_units: int = 8, max_coupling: float = 0.7,
               dtype: torch.dtype = torch.float64) -> ToyProblem:
    """A :class:`ToyProblem`: a random converging toy model in ``dtype`` and a batch of 1–4 samples."""
    config = draw(toy_configs(conservative, T1=T1, eps=eps, max_units=max_units, max_coupling=max_coupling))
    return make_toy_problem(config, init_seed=draw(SEEDS), batch_size=draw(st.integers(1, 4)),
                            batch_seed=draw(SEEDS), dtype=dtype)


class ResidualProblem(Problem):
    """A tiny resmlp (:class:`ResMLP`) and a batch of random images in [0, 1] and labels."""


def make_residual_problem(config: ResMLPConfig, *, init_seed: int, batch_size: int, batch_seed: int,
                          dtype: torch.dtype = torch.float64) -> ResidualProblem:
    """The resmlp (parameters from ``init_seed``) and a batch of random images and labels (from ``batch_seed``)."""
    model = ResMLP(config, generator=torch.Generator().manual_seed(init_seed)).to(dtype=dtype)
    generator = torch.Generator().manual_seed(batch_seed)
    images = torch.rand(batch_size, config.channels, config.image, config.image, generator=generator, dtype=dtype)
    labels = torch.randint(config.classes, (batch_size,), generator=generator)
    batch = model.prepare_batch(images, labels, generator=generator)
    return ResidualProblem(model, batch, config, init_seed, batch_size, batch_seed, dtype)


ResidualProblem.make = staticmethod(make_residual_problem)


@st.composite
def residual_models(draw: st.DrawFn, *, dtype: torch.dtype = torch.float64) -> ResidualProblem:
    """A :class:`ResidualProblem`: width 2–8, 1–3 blocks, 2×2 to 4×4 images of 1–3 channels, 2–5 classes, a
    batch of 1–4 samples."""
    config = ResMLPConfig(dim=draw(st.integers(2, 8)), blocks=draw(st.integers(1, 3)),
                          hidden=draw(st.integers(2, 8)), channels=draw(st.integers(1, 3)),
                          image=draw(st.integers(2, 4)), classes=draw(st.integers(2, 5)))
    return make_residual_problem(config, init_seed=draw(SEEDS), batch_size=draw(st.integers(1, 4)),
                                 batch_seed=draw(SEEDS), dtype=dtype)


class LocalProblem(Problem):
    """A tiny localgpt (:class:`LocalGPT`) and a batch of random token windows."""


def make_local_problem(config: LocalGPTConfig, *, init_seed: int, batch_size: int, batch_seed: int,
                       dtype: torch.dtype = torch.float64) -> LocalProblem:
    """The localgpt (parameters from ``init_seed``) and ``batch_size`` random windows of ``config.context`` token
    ids with their next tokens (from ``batch_seed``)."""
    model = LocalGPT(config, generator=torch.Generator().manual_seed(init_seed)).to(dtype=dtype)
    generator = torch.Generator().manual_seed(batch_seed)
    tokens = torch.randint(config.vocab, (batch_size, config.context + 1), generator=generator)
    batch = model.prepare_batch(tokens[:, :-1], tokens[:, 1:], generator=generator)
    return LocalProblem(model, batch, config, init_seed, batch_size, batch_seed, dtype)


LocalProblem.make = staticmethod(make_local_problem)


@st.composite
def local_models(draw: st.DrawFn, *, dtype: torch.dtype = torch.float64) -> LocalProblem:
    """A :class:`LocalProblem`: 1–2 blocks of 1–2 heads 2–4 wide each, softmax or sigmoid attention, a context of
    1–5 and a vocabulary of 2–7 characters, a batch of 1–3 windows."""
    heads = draw(st.integers(1, 2))
    config = LocalGPTConfig(context=draw(st.integers(1, 5)), layers=draw(st.integers(1, 2)), heads=heads,
                            width=heads * draw(st.integers(2, 4)), attn=draw(st.sampled_from(("softmax", "sigmoid"))),
                            vocab=draw(st.integers(2, 7)))
    return make_local_problem(config, init_seed=draw(SEEDS), batch_size=draw(st.integers(1, 3)),
                              batch_seed=draw(SEEDS), dtype=dtype)


def models(*, protocol: type = EquilibriumModel, conservative: bool | None = None, T1: int = T1, eps: float = EPS,
           max_units: int = 8, max_coupling: float = 0.7,
           dtype: torch.dtype = torch.float64) -> st.SearchStrategy[Any]:
    """Problems (``model, batch = problem``) whose model satisfies ``protocol``: random converging toys for the
    protocols a toy satisfies (``Model``, ``EquilibriumModel``), tiny residual MLPs for ``ResidualModel``, tiny
    localgpts for ``LocalModel``.

    ``conservative`` None draws both kinds of toy; ``problem.conservative`` says which was drawn (None for a
    residual problem, which has no such notion). The toys are float64 and tiny (3–8 units), so a check runs in
    milliseconds; their free phase converges within the default T1. A smaller ``max_coupling`` contracts faster
    (at most 1 − eps·(1 − max_coupling) per step) and allows a smaller T1.
    """
    if isinstance(Toy(ToyConfig(), generator=torch.Generator().manual_seed(0)), protocol):
        return toy_models(conservative, T1=T1, eps=eps, max_units=max_units, max_coupling=max_coupling, dtype=dtype)
    if isinstance(ResMLP(ResMLPConfig(dim=2, image=2), generator=torch.Generator().manual_seed(0)), protocol):
        if conservative is not None:
            raise TypeError("residual models are neither conservative nor not: draw them with conservative=None")
        return residual_models(dtype=dtype)
    if isinstance(LocalGPT(LocalGPTConfig(vocab=2, width=2, heads=1, layers=1), generator=torch.Generator()),
                  protocol):
        if conservative is not None:
            raise TypeError("local models are neither conservative nor not: draw them with conservative=None")
        return local_models(dtype=dtype)
    raise TypeError(f"the kit draws toy equilibrium models, tiny residual MLPs and tiny localgpts; none satisfies "
                    f"{protocol.__name__}")


@st.composite
def batches(draw: st.DrawFn, model: torch.nn.Module, *, max_size: int = 4) -> Batch:
    """A batch of 1–``max_size`` samples for ``model``: its own ``make_batch`` for synthetic-data models; random
    token ids or images in [0, 1] for text and image models, prepared by the model."""
    size = draw(st.integers(1, max_size))
    generator = torch.Generator().manual_seed(draw(SEEDS))
    if isinstance(model, SyntheticData):
        return model.make_batch(size, generator=generator)
    parameter = next(model.parameters())
    shape = model.data.sample_shape(model.config)
    if model.data.kind == "text":
        tokens = torch.randint(model.config.vocab, (size, shape[0] + 1), generator=generator)
        return model.prepare_batch(tokens[:, :-1], tokens[:, 1:], generator=generator)
    images = torch.rand(size, *shape, generator=generator, dtype=parameter.dtype)
    return model.prepare_batch(images, torch.zeros(size, dtype=torch.long), generator=generator)


@st.composite
def configs(draw: st.DrawFn, estimator: Any, *, max_int: int = 50) -> Config:
    """A config of ``estimator`` (class or instance) with every field drawn inside its declared range.

    Floats are drawn log-uniformly where the range allows (β = 1e-4 and β = 0.5 are equally likely), integers
    up to ``max_int`` above their lower bound; choices and booleans uniformly; optional fields are None one time
    in four.
    """
    cls = estimator if isinstance(estimator, type) else type(estimator)
    config_cls = cls.Config
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        kind, nullable = config_cls.field_types()[f.name]
        meta = f.metadata
        if nullable and draw(st.integers(0, 3)) == 0:
            values[f.name] = None
            continue
        values[f.name] = draw(_value(kind, meta, f.default, max_int))
    return config_cls(**values)


def _value(kind: type, meta: Any, default: Any, max_int: int) -> st.SearchStrategy:
    if meta.get("choices"):
        return st.sampled_from(meta["choices"])
    if kind is bool:
        return st.booleans()
    low = meta.get("ge") if meta.get("ge") is not None else meta.get("gt")
    high = meta.get("le") if meta.get("le") is not None else meta.get("lt")
    exclude_low, exclude_high = meta.get("gt") is not None, meta.get("lt") is not None
    if kind is int:
        start = int(low) + (1 if exclude_low else 0) if low is not None else 0
        stop = int(high) - (1 if exclude_high else 0) if high is not None else start + max_int
        return st.integers(start, max(start, stop))
    if kind is float:
        if low is not None and low >= 0 and high is None:
            # log-uniform over (low, default·100]: the scale is what matters for step sizes and strengths
            floor = max(low, 1e-6 if default is None or default == 0 else default * 1e-3)
            ceiling = max(floor * 10, (default or 1.0) * 10)
            return st.floats(math.log(floor), math.log(ceiling)).map(math.exp).filter(
                lambda v: v > low if exclude_low else v >= low)
        return st.floats(low if low is not None else -1e3, high if high is not None else 1e3,
                         exclude_min=exclude_low, exclude_max=exclude_high, allow_nan=False)
    return st.just(default)
