"""Relaxation machinery shared by every estimator.

Notation (DESIGN.md): state x, parameters θ, step ε, relaxation map G(x) = Π(x + εF(x)). The free phase iterates
G for T1 steps from ``init_state`` and gives x*; its residual is r = ||G(x*) − x*|| / ||x*||; g = ∇ₓC(x*).

Relaxations run without an autograd graph, so their memory does not grow with the number of steps. A relaxation
that leaves the finite numbers raises :class:`DivergenceError` naming the first non-finite step and a remedy;
finiteness is accumulated on the device and read once every ``CHECK_EVERY`` steps (:func:`ep_core.solvers.iterate`),
so that the loop does not wait for the device at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NoReturn

import torch

from ep_core.capture import report
from ep_core.protocols import Batch, CachesParameterTerms, DifferentiatesCost, DivergenceError, Equilibrium, State
from ep_core.solvers import is_finite as is_finite  # a primitive plugins take from here, with the rest
from ep_core.solvers import SOLVERS, fixed_steps, iterate

CONVERGED_TOL = 1e-4
"""A free phase whose relative residual ||G(x*) − x*|| / ||x*|| exceeds this is reported as not converged."""

Field = Callable[[State], State]
"""The force of one phase as a function of the state: F for the free phase, F − β∇ₓC (:func:`nudge`) or a
corrected form of it for a nudged one. An estimator that changes a nudged phase writes its own field, and so
decides how the field's parts are evaluated (aep takes F and N from one pass where the model offers it)."""


# One kernel per operation where torch has one: on a GPU a relaxation step costs about its kernel count.
def add(a: State, b: State, scale: float = 1.0) -> State:
    return tuple(torch.add(ai, bi, alpha=scale) for ai, bi in zip(a, b, strict=True))


def sub(a: State, b: State) -> State:
    return tuple(ai - bi for ai, bi in zip(a, b, strict=True))


def scale(a: State, factor: float | torch.Tensor) -> State:
    return tuple(factor * ai for ai in a)


def inner(a: State, b: State) -> torch.Tensor:
    products = [torch.vdot(ai.reshape(-1), bi.reshape(-1)) for ai, bi in zip(a, b, strict=True)]
    return products[0] if len(products) == 1 else torch.stack(products).sum()


def norm(a: State) -> torch.Tensor:
    sizes = [torch.linalg.vector_norm(ai) for ai in a]
    return sizes[0] if len(sizes) == 1 else torch.linalg.vector_norm(torch.stack(sizes))


def detach(a: State) -> State:
    return tuple(ai.detach() for ai in a)


def step(model, batch: Batch, state: State, force: State) -> State:
    """G given F(x) already computed: Π(x + εF(x))."""
    return model.project(add(state, force, model.dynamics.eps))


def relaxation_map(model, batch: Batch) -> Callable[[State], State]:
    """G as a pure function of the state, for torch.func transforms."""
    return lambda state: step(model, batch, state, model.force(state, batch))


@dataclass
class Relaxation:
    state: State
    steps: int
    converged: bool | None = None
    """Whether a solver with a tolerance reached it (:class:`ep_core.solvers.Solved`); None for plain steps."""


@dataclass(frozen=True)
class PhaseRecord:
    phase: str
    evaluations: int
    converged: bool | None
    residual: float | None = None
    """The relative residual the solver stopped at (:class:`ep_core.solvers.Solved`): above ``tol`` where the phase
    converged to the state's resolution instead."""


_RECORDS: ContextVar[list[PhaseRecord] | None] = ContextVar("epx_relaxation_records", default=None)


@contextmanager
def recording() -> Iterator[list[PhaseRecord]]:
    """Record every relaxation that runs while the block does, in order: its phase, the field evaluations it used
    and whether it reached its solver's tolerance. How the harness learns, without estimators reporting it, that a
    tolerance solver's nudged phases stopped on their bound T2 instead of their tolerance."""
    records: list[PhaseRecord] = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)


def relax(model, batch: Batch, state: State, steps: int, *, phase: str, field: Field | None = None,
          solver: str | None = None, origin: State | None = None) -> Relaxation:
    """Find the fixed point of x ↦ Π(x + εΦ(x)) from ``state``, Φ the ``field`` (default: the model's force F),
    without building a graph: with the model's solver (or ``solver``), ``steps`` plain steps or at most ``steps``
    accelerated ones (:mod:`ep_core.solvers`), whose tolerance is relative to the distance from ``origin``
    (default: ``state``); ``Relaxation.steps`` is the number of field evaluations used."""
    dynamics = model.dynamics
    eps = dynamics.eps

    def update(x: State) -> State:
        return step(model, batch, x, model.force(x, batch) if field is None else field(x))

    def diverged(t: int) -> NoReturn:
        raise DivergenceError(phase, t, eps, divergence_remedy(phase, eps))

    with torch.no_grad():
        solved = SOLVERS[solver or dynamics.solver](update, detach(state), steps, tol=dynamics.tol,
                                                    memory=dynamics.memory, diverged=diverged,
                                                    origin=None if origin is None else detach(origin))
    records = _RECORDS.get()
    if records is not None:
        records.append(PhaseRecord(phase, solved.evaluations, solved.converged, solved.residual))
    return Relaxation(state=solved.state, steps=solved.evaluations, converged=solved.converged)


def divergence_remedy(phase: str, eps: float) -> str:
    base = f"lower the step size (e.g. --model-set eps={eps / 2:g})"
    if phase == "nudged":
        return base + " or the nudge strength beta (e.g. --set beta=0.01)"
    return base + " or the non-conservative scale s, which can remove the stable fixed point"


def residual(model, batch: Batch, state: State) -> float:
    """r = ||G(x) − x|| / ||x||; one force evaluation (read out after the replay in a captured estimate)."""
    with torch.no_grad():
        moved = relaxation_map(model, batch)(state)
        return report(norm(sub(moved, state)) / norm(state).clamp_min(torch.finfo(state[0].dtype).tiny))


def free_phase(model, batch: Batch, steps: int | None = None) -> Equilibrium:
    """x* after T1 steps of G from ``init_state`` (T1 from the model unless given)."""
    steps = model.dynamics.T1 if steps is None else steps
    with torch.no_grad():
        start = model.init_state(batch)
    run = relax(model, batch, start, steps, phase="free")
    return Equilibrium(state=run.state, residual=residual(model, batch, run.state), steps=run.steps)


def unrolled(model, batch: Batch) -> tuple[torch.Tensor, State]:
    """(C(x_T1), x_T1) with x₀ = init_state, x_{t+1} = G(x_t), T1 steps, keeping the autograd graph: what an
    equilibrium model's ``loss`` is, and what bptt differentiates. A non-finite state is a DivergenceError."""
    eps = model.dynamics.eps

    def diverged(t: int) -> NoReturn:
        raise DivergenceError("free", t, eps, divergence_remedy("free", eps))

    if isinstance(model, CachesParameterTerms):
        batch = model.with_parameter_terms(batch)
    x = iterate(relaxation_map(model, batch), model.init_state(batch), model.dynamics.T1, diverged=diverged)
    return model.cost(x, batch), x


def unrolled_loss(model, batch: Batch) -> torch.Tensor:
    """The loss of an equilibrium model: C after the free phase unrolled for T1 steps (see :func:`unrolled`)."""
    return unrolled(model, batch)[0]


def cost_gradient(model, batch: Batch, state: State) -> State:
    """g = ∇ₓC(x): the model's own where it computes it (:class:`DifferentiatesCost`), else plain reverse mode on a
    fresh leaf. It runs every nudged step, where torch.func.grad's per-call transform setup cost 0.29 ms against
    0.11 ms for this on cet."""
    if isinstance(model, DifferentiatesCost):
        with torch.no_grad():
            return model.cost_gradient(state, batch)
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_() for t in state)
        cost = model.cost(leaves, batch)
        return detach(torch.autograd.grad(cost, leaves, allow_unused=True, materialize_grads=True))


def nudged_force(model, batch: Batch, state: State, force: State, beta: float) -> State:
    """F(x) − β∇ₓC(x), given F(x)."""
    return add(force, cost_gradient(model, batch, state), -beta)


def nudge(model, batch: Batch, beta: float) -> Field:
    """The nudged field x ↦ F(x) − β∇ₓC(x)."""
    return lambda x: nudged_force(model, batch, x, model.force(x, batch), beta)


def contrast(model, batch: Batch, equilibrium: Equilibrium, *, beta: float, steps: int, centered: bool,
             nudged: Callable[[float], Field] | None = None) -> State:
    """The EP adjoint estimate a: relax T2 steps from x* under the field nudged by ∓β (``nudged(β)``; default
    :func:`nudge`, F ∓ β∇ₓC) and form

    a = (x⁻ − x⁺) / (2β)  (centered)   or   a = (x* − x⁺) / β  (one-sided).

    A solver that runs to a tolerance starts the −β phase from 2x* − x⁺, the reflection of the +β phase's end:
    the two fixed points are x* ± δ + O(β²), so it starts O(β²) from its own instead of O(β), and its tolerance
    stays relative to the displacement from x*. The plain solver starts both from x*, as T2 steps are defined.
    """
    x_star = equilibrium.state
    field = nudged or (lambda strength: nudge(model, batch, strength))
    plus = relax(model, batch, x_star, steps, phase="nudged", field=field(beta))
    if centered:
        start = x_star if fixed_steps(model.dynamics) else sub(scale(x_star, 2.0), plus.state)
        minus = relax(model, batch, start, steps, phase="nudged", field=field(-beta), origin=x_star)
        return scale(sub(minus.state, plus.state), 1 / (2 * beta))
    return scale(sub(x_star, plus.state), 1 / beta)


def linearize(fn: Callable[[State], State], state: State) -> tuple[State, Callable[[State], State]]:
    """(fn(x), u ↦ (∂fn/∂x)ᵀu) at x, the vjp closure built once so each application is one backward pass."""
    value, vjp_fn = torch.func.vjp(fn, detach(state))
    return detach(value), lambda cotangent: vjp_fn(cotangent)[0]


def parameter_gradient(model: torch.nn.Module, objective: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """∂objective/∂θ for every named parameter (zeros where it does not depend on θ); ``param.grad`` untouched."""
    trainable = [p for _, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        value = objective()
        grads = dict(zip(map(id, trainable), torch.autograd.grad(value, trainable, allow_unused=True)))
    return {name: (torch.zeros_like(p) if grads.get(id(p)) is None else grads[id(p)].detach())
            for name, p in model.named_parameters()}


def force_pairing(model, batch: Batch, state: State, direction: State) -> dict[str, torch.Tensor]:
    """ĝ = ∂/∂θ [⟨a, F(x; θ)⟩ + C(x; θ)] at a fixed x: the EP family's parameter update."""
    x = detach(state)
    a = detach(direction)
    return parameter_gradient(model, lambda: inner(a, model.force(x, batch)) + model.cost(x, batch))
