"""check_model — an equilibrium model's optional members against their definitions (docs/models.md).

    from ep_core.testing import check_model

    report = check_model(model, batch)        # raises ConformanceError naming the failed checks

A protocol a model declares is a promise the core acts on without checking it: aep linearises only N because
F − N is declared a gradient field, every nudged step takes the model's own ∇ₓC, aep's nudged step takes F and
N from ``split_force``, or F − N from ``conservative``. A broken promise gives wrong gradients, not an error.
Each check here runs where the model declares its protocol (else it is "skipped"), at two states:
x₀ = init_state(batch) and x₀ + 0.1·‖x₀‖·u for a random unit direction u (``seed``; entries of RMS 0.1 when
x₀ = 0), so that a member that is right only at the start fails too:

    shapes            init_state and force give tensors of one shape each; cost is a finite scalar
    projection        Π(Π(x)) = Π(x), to at least :data:`PROJECTION_TOLERANCE`
    parameter_terms   F(x) with the batch's cached parameter terms = F(x) without     (CachesParameterTerms)
    split_force       split_force(x) = (force(x), nonconservative(x))               (SplitsForce)
    conservative      conservative(x) = force(x) − nonconservative(x)                (DeclaresConservative)
    gradient_part     F − N has a symmetric Jacobian: ⟨u, J v⟩ = ⟨v, J u⟩ for random u, v  (DeclaresNonconservative)
    cost_gradient     cost_gradient(x) = ∇ₓC(x) by reverse mode                     (DifferentiatesCost)

Equalities hold to a relative tolerance of the model's dtype (:data:`TOLERANCE`): the two sides may take
different kernels (a fused attention against its parts).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ep_core.protocols import (Batch, CachesParameterTerms, DeclaresConservative, DeclaresNonconservative,
                               DifferentiatesCost, EquilibriumModel, SplitsForce, State)
from ep_core.relax import inner, linearize, norm, sub
from ep_core.testing.conformance import CheckResult, ConformanceError, ConformanceReport, SUITE_VERSION

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
"""Relative tolerance of the equalities, by the model's dtype (others: float32's)."""
PERTURBATION = 0.1
TITLE = "epx model checks"
PROJECTION_TOLERANCE = 1e-6
"""A normalisation's ε makes Π only nearly idempotent (cet's token norm: 3.5e-9 in float64)."""


def check_model(model: torch.nn.Module, batch: Batch, *, seed: int = 0,
                raise_on_failure: bool = True) -> ConformanceReport:
    """Run every check of this module on ``model`` and ``batch``: the report, or (``raise_on_failure``)
    ConformanceError when a check failed. ``model`` must be an :class:`~ep_core.protocols.EquilibriumModel`."""
    if not isinstance(model, EquilibriumModel):
        raise TypeError(f"check_model checks equilibrium models; {type(model).__name__} has no init_state, force, "
                        "project and cost")
    states = _states(model, batch, seed)
    tol = TOLERANCE.get(states[0][0].dtype, TOLERANCE[torch.float32])
    report = ConformanceReport(estimator=type(model).__name__, suite=SUITE_VERSION, title=TITLE)
    for name, applies, check in _CHECKS:
        started = time.perf_counter()
        if not applies(model):
            report.results.append(CheckResult(name, "skipped", "the model does not declare it"))
            continue
        try:
            for state in states:
                check(model, batch, state, tol, seed)
        except AssertionError as failure:
            report.results.append(CheckResult(name, "failed", str(failure), time.perf_counter() - started))
        else:
            report.results.append(CheckResult(name, "passed", "", time.perf_counter() - started))
    if raise_on_failure and not report.passed:
        raise ConformanceError(report)
    return report


def _states(model, batch: Batch, seed: int) -> list[State]:
    with torch.no_grad():
        start = tuple(t.detach() for t in model.init_state(batch))
        directions = _random_like(start, seed)
        # A start at zero (the toy's) gets entries of RMS 0.1: a zero state would pass any homogeneous member.
        reach = float(norm(start)) or sum(t.numel() for t in start) ** 0.5
        size = PERTURBATION * reach / float(norm(directions))
        return [start, tuple(t + size * d for t, d in zip(start, directions))]


def _random_like(state: State, seed: int) -> State:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in state)


def _close(what: str, got: State, expected: State, tol: float) -> None:
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        raise AssertionError(f"{what}: shapes {[tuple(g.shape) for g in got]}, expected "
                             f"{[tuple(e.shape) for e in expected]}")
    error = float(norm(sub(got, expected)) / norm(expected).clamp_min(torch.finfo(expected[0].dtype).tiny))
    if not error <= tol:
        raise AssertionError(f"{what}: relative difference {error:.3g}, above {tol:g}")


def _shapes(model, batch: Batch, state: State, tol: float, seed: int) -> None:
    with torch.no_grad():
        force = model.force(state, batch)
        cost = model.cost(state, batch)
    if [t.shape for t in force] != [t.shape for t in state]:
        raise AssertionError(f"force gives shapes {[tuple(t.shape) for t in force]} for a state of "
                             f"{[tuple(t.shape) for t in state]}")
    if cost.dim() != 0 or not bool(torch.isfinite(cost)):
        raise AssertionError(f"cost must be a finite scalar, got shape {tuple(cost.shape)}, value {cost}")


def _projection(model, batch: Batch, state: State, tol: float, seed: int) -> None:
    with torch.no_grad():
        once = model.project(state)
        _close("Π(Π(x)) against Π(x)", model.project(once), once, max(tol, PROJECTION_TOLERANCE))


def _parameter_terms(model, batch: Batch, state: State, tol: float, seed: int) -> None:
    with torch.no_grad():
        _close("force with the cached parameter terms against force without", model.force(
            state, model.with_parameter_terms(batch)), model.force(state, batch), tol)


def _split_force(model, batch: Batch, state: State, tol: float, seed: int) -> None:
    with torch.no_grad():
        force, part = model.split_force(state, batch)
        _close("split_force's F against force", force, model.force(state, batch), tol)
        _close("split_force's N against nonconservative", part, model.nonconservative(state, batch), tol)


def _conservative(model, batch: Batch, state: State, tol: float, seed: int) -> None:
    with torch.no_grad():
        _close("conservative against force − nonconservative", model.conservative(state, batch),
               sub(model.force(state, batch), model.nonconservative(state, batch)), tol)


def _gradient_part(model, batch: Batch, state: State, tol: float, seed: int) -> None:
    def gradient_part(x: State) -> State:
        return sub(model.force(x, batch), model.nonconservative(x, batch))
    _, transpose = linearize(gradient_part, state)
    u, v = _random_like(state, seed + 1), _random_like(state, seed + 2)
    with torch.no_grad():
        Jt_u, Jt_v = transpose(u), transpose(v)
        u_J_v, v_J_u = float(inner(Jt_u, v)), float(inner(Jt_v, u))
        scale = float(norm(Jt_u) * norm(v) + norm(Jt_v) * norm(u))
    if not abs(u_J_v - v_J_u) <= tol * scale:
        raise AssertionError(f"F − N is not a gradient field: its Jacobian J is not symmetric, ⟨u, J v⟩ = {u_J_v:.6g} "
                             f"but ⟨v, J u⟩ = {v_J_u:.6g} for random u, v; nonconservative must return all of F's "
                             "non-gradient part, or aep leaves the rest uncorrected")


def _cost_gradient(model, batch: Batch, state: State, tol: float, seed: int) -> None:
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_() for t in state)
        expected = torch.autograd.grad(model.cost(leaves, batch), leaves, allow_unused=True, materialize_grads=True)
    with torch.no_grad():
        _close("cost_gradient against reverse mode through cost", model.cost_gradient(state, batch), expected, tol)


Check = Callable[..., None]
_CHECKS: tuple[tuple[str, Callable[[object], bool], Check], ...] = (
    ("shapes", lambda model: True, _shapes),
    ("projection", lambda model: True, _projection),
    ("parameter_terms", lambda model: isinstance(model, CachesParameterTerms), _parameter_terms),
    ("split_force", lambda model: isinstance(model, SplitsForce), _split_force),
    ("conservative", lambda model: isinstance(model, DeclaresConservative), _conservative),
    ("gradient_part", lambda model: isinstance(model, DeclaresNonconservative), _gradient_part),
    ("cost_gradient", lambda model: isinstance(model, DifferentiatesCost), _cost_gradient),
)
MODEL_CHECK_NAMES = tuple(name for name, _, _ in _CHECKS)
