"""Hypothesis strategies for epx: small random problems on which estimators can be checked.

    from hypothesis import given
    from ep_core.testing.strategies import toy_models

    @given(toy_models(conservative=False))
    def test_my_rule(problem):
        model, batch = problem
        ...

A drawn :class:`ToyProblem` prints as the call that rebuilds it (``make_toy_problem(...)``; also
``problem.rebuild()``), so a failing example that Hypothesis reports can be reproduced outside Hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from ep_core.models.toy import Toy, ToyConfig
from ep_core.protocols import Batch

T1 = 300
"""Free-phase steps at ``EPS``. At a toy's fixed point every eigenvalue of J = ∂F/∂x has real part at most
−(1 − coupling), so with coupling ≤ 0.7 and ε = 0.2 the relaxation contracts by at most ≈ 0.94 per step (the
worst of 300 random toys: 0.938, whose free-phase residual fell below 1e-12 within 300 steps)."""
EPS = 0.2


@dataclass(frozen=True, repr=False, eq=False)
class ToyProblem:
    """A toy model and a batch for it, plus the config and seeds that rebuild both."""

    model: Toy
    batch: Batch
    config: ToyConfig
    init_seed: int
    batch_size: int
    batch_seed: int
    dtype: torch.dtype = torch.float64

    def __iter__(self):
        """``model, batch = problem``."""
        return iter((self.model, self.batch))

    def __repr__(self) -> str:
        return (f"make_toy_problem({self.config!r}, init_seed={self.init_seed}, "
                f"batch_size={self.batch_size}, batch_seed={self.batch_seed}, dtype={self.dtype})")

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # how Hypothesis prints a falsifying example
        printer.text(repr(self))

    def rebuild(self) -> ToyProblem:
        """A fresh, identical copy (new parameter tensors), e.g. to reproduce a failure outside Hypothesis."""
        return make_toy_problem(self.config, init_seed=self.init_seed, batch_size=self.batch_size,
                                batch_seed=self.batch_seed, dtype=self.dtype)


def make_toy_problem(config: ToyConfig, *, init_seed: int, batch_size: int, batch_seed: int,
                     dtype: torch.dtype = torch.float64) -> ToyProblem:
    """The toy (parameters from ``init_seed``) and its batch (from ``batch_seed``), deterministically."""
    model = Toy(config, generator=torch.Generator().manual_seed(init_seed)).to(dtype=dtype)
    batch = model.make_batch(batch_size, generator=torch.Generator().manual_seed(batch_seed))
    return ToyProblem(model, batch, config, init_seed, batch_size, batch_seed, dtype)


SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


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
