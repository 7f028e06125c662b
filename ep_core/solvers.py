"""Fixed-point solvers for the relaxations, in a plain registry (:data:`SOLVERS`), chosen by the model's dynamics.

Both find x with x = U(x) for a relaxation's update U (the free phase's G, or a nudged phase's G with its field),
starting from x₀, with at most ``steps`` evaluations of U:

    plain      x_{k+1} = U(x_k), exactly ``steps`` times: the map bptt differentiates and T1, T2 count
    anderson   Anderson acceleration (Walker & Ni 2011, as torchdeq and the DEQ literature use it): with the last
               m iterates x_i and their images u_i = U(x_i), residuals f_i = u_i − x_i, the next iterate is
               x_{k+1} = Σ_i α_i u_i  with  α = argmin ‖Σ_i α_i f_i‖²  subject to  Σ_i α_i = 1,
               solved per sample (each sample's fixed point is its own) from the m×m Gram matrix of the
               normalised f_i/‖f_i‖, regularised by 1e-10; it stops as soon as the residual relative to
               the distance travelled, ‖U(x) − x‖ / ‖U(x) − x₀‖ over the batch, is at most ``tol``, and returns
               U(x) there; when the smallest residual seen has not halved in :data:`PATIENCE`·m evaluations
               (:data:`STALL`; the rounding floor: cet's nudged phases in float64 stall near 1e-10, plain and
               accelerated alike, and float32 ones creep below their resolution), it returns the U(x) of that
               smallest residual.

The residual is measured against the distance from the start (or from an ``origin`` the caller names: x* for a
nudged phase started elsewhere), not against ‖x‖: a nudged phase moves x* by O(β), and EP divides that
displacement by β, so its error must be small relative to the displacement itself.

Anderson reaches the fixed point that the plain iteration converges to (when it converges) in far fewer
evaluations; it does not change where the fixed point is, so it applies to the free and nudged phases of every
estimator. It reads the residual back once per evaluation, to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

import torch

from ep_core.capture import finite
from ep_core.config import option
from ep_core.protocols import State

CHECK_EVERY = 16
"""Steps between two reads of the finiteness flag: a read makes the host wait for the device, which on a GPU
costs more than the step itself."""
Update = Callable[[State], State]


class Solved(NamedTuple):
    state: State
    evaluations: int
    converged: bool | None
    """Whether the residual reached the tolerance: False where the solver stopped on its bound of evaluations, or
    where its residual stopped falling; None for a solver without a tolerance (plain)."""


Solver = Callable[..., Solved]

REGULARISATION = 1e-10
PATIENCE = 10
STALL = 0.5
"""Anderson stops when its smallest residual has not fallen below STALL times what it was PATIENCE·m evaluations
earlier. Below float32's resolution, lm's nudged phases creep from 1e-5 to 3e-6 of their displacement over a
hundred evaluations: with T2 = 2000 and tol 1e-6, aep's two stop after 173 evaluations, its gradient 1.48e-5 from
the converged one, where waiting for any new smallest residual took 333 for 1.45e-5."""


def is_finite(a: State) -> bool:
    """Whether every entry is finite: exact (a sum can overflow on finite entries), one host read per tensor."""
    return all(bool(torch.isfinite(ai).all()) for ai in a)


def iterate(update: Callable[[State], State], start: State, steps: int, *,
            diverged: Callable[[int], NoReturn]) -> State:
    """x_{t+1} = update(x_t) for ``steps`` steps from ``start``. Once per :data:`CHECK_EVERY` steps the sum of the
    state's entries is formed on the device and read; a chunk that ends non-finite is run again from its start
    checking every step, and ``diverged(t)`` is called with the first non-finite step t. The end of a chunk
    stands for all of it because a non-finite value does not come back: an inf turns into NaN at the next
    difference, and NaN passes through every operation of a force; checking each step instead would add a
    reduction per state tensor to every step, a fifth of a GPU step's kernels. ``update`` must be deterministic,
    so that the second run retraces the first (a sum that overflowed on finite states finds no such step, and the
    iteration goes on). Inside a captured estimate the sums are read after the replay instead
    (:func:`ep_core.capture.finite`)."""
    x, done = start, 0
    while done < steps:
        chunk = min(CHECK_EVERY, steps - done)
        begin = x
        for _ in range(chunk):
            x = update(x)
        if not finite(_sum(x)):
            x = begin
            for t in range(done + 1, done + chunk + 1):
                x = update(x)
                if not is_finite(x):
                    diverged(t)
        done += chunk
    return x


def _sum(a: State) -> torch.Tensor:
    sums = [ai.sum() for ai in a]
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum()


def plain(update: Update, start: State, steps: int, *, tol: float, memory: int,
          diverged: Callable[[int], NoReturn], origin: State | None = None) -> Solved:
    """``steps`` plain steps (``tol``, ``memory`` and ``origin`` unused): x_steps."""
    return Solved(iterate(update, start, steps, diverged=diverged), steps, None)


def anderson(update: Update, start: State, steps: int, *, tol: float, memory: int,
             diverged: Callable[[int], NoReturn], origin: State | None = None) -> Solved:
    """Anderson acceleration (module docstring): U(x) at the first x within ``tol``, converged, or else U(x) at the
    smallest residual seen, not converged; at most ``steps`` evaluations. The residual is relative to the
    distance from ``origin`` (default: ``start``). ``diverged(k)`` is called at the first evaluation k whose image
    is not finite.

    The last ``memory`` images and residuals live in ring buffers (batch × memory × n, in the state's dtype) and
    the residuals' Gram matrix is updated by one row per evaluation: one pass over the history for the new
    products and one for the mixing, where rebuilding both from a stacked history cost as much as a force
    evaluation on lm."""
    if steps < 1:
        return Solved(start, 0, False)
    shapes = [t.shape for t in start]
    batch = shapes[0][0]
    sizes = [t[0].numel() for t in start]

    def flat(state: State) -> torch.Tensor:
        if len(state) == 1:  # a view, not a copy
            return state[0].reshape(batch, -1)
        return torch.cat([t.reshape(batch, -1) for t in state], dim=1)

    def unflat(vector: torch.Tensor) -> State:
        return tuple(part.reshape(shape) for part, shape in zip(vector.split(sizes, dim=1), shapes))

    x = flat(start)
    reference = x if origin is None else flat(origin)
    images = torch.empty(batch, memory, x.shape[1], dtype=x.dtype, device=x.device)
    residuals = torch.empty_like(images)
    gram = torch.zeros(batch, memory, memory, dtype=torch.float64, device=x.device)
    tiny = torch.finfo(torch.float64).tiny
    best = (float("inf"), x, 0)
    smallest: list[float] = []   # the smallest residual after each evaluation
    stored = 0
    for k in range(1, steps + 1):
        image = flat(update(unflat(x)))
        if not bool(torch.isfinite(image.sum())):
            diverged(k)
        f = image - x
        moved = torch.linalg.vector_norm(image - reference)
        residual = float(torch.linalg.vector_norm(f) / moved.clamp_min(torch.finfo(x.dtype).tiny))
        residual = residual if residual == residual else float("inf")  # an overflow on finite states is not NaN
        if residual <= tol:
            return Solved(unflat(image), k, True)
        if residual < best[0]:
            best = (residual, image, k)
        smallest.append(best[0])
        window = PATIENCE * memory
        if k == steps or (k > window and best[0] > STALL * smallest[k - 1 - window]):
            return Solved(unflat(best[1]), k, False)
        if residual == float("inf"):  # the residuals' products would overflow: no mixing, a plain step
            x = image
            continue
        slot, count = stored % memory, min(stored + 1, memory)
        stored += 1
        images[:, slot], residuals[:, slot] = image, f
        # vecdot, not bmm: a batch of matrix-vector products is a gemv that bmm runs 4.5× slower on the CPU (lm:
        # 1.0 against 0.22 ms, about a third of a force evaluation).
        products = torch.linalg.vecdot(residuals[:, :count], f[:, None, :]).double()       # B × count
        gram[:, slot, :count] = gram[:, :count, slot] = products
        # α = argmin ‖Σ α_i f_i‖² with Σ α_i = 1, from the Gram matrix of the unit f_i/‖f_i‖: a unit diagonal, so
        # the newest residuals, orders of magnitude smaller than the oldest, are not lost below the
        # regularisation.
        lengths = torch.diagonal(gram[:, :count, :count], dim1=1, dim2=2).clamp_min(tiny).sqrt()     # B × count
        system = torch.zeros(batch, count + 1, count + 1, dtype=torch.float64, device=x.device)
        system[:, 0, 1:] = system[:, 1:, 0] = 1 / lengths
        system[:, 1:, 1:] = gram[:, :count, :count] / (lengths[:, :, None] * lengths[:, None, :]) + \
            REGULARISATION * torch.eye(count, dtype=torch.float64, device=x.device)
        rhs = torch.zeros(batch, count + 1, 1, dtype=torch.float64, device=x.device)
        rhs[:, 0] = 1
        alpha = (torch.linalg.solve(system, rhs)[:, 1:, 0] / lengths).to(x.dtype)                # B × count
        x = torch.bmm(alpha[:, None, :], images[:, :count])[:, 0]
    raise AssertionError("the loop returns at its last evaluation")


SOLVERS: dict[str, Solver] = {"plain": plain, "anderson": anderson}
FIXED_STEPS = frozenset({"plain"})
"""Solvers whose work does not depend on the data, so that a relaxation they run can be captured as a CUDA graph."""


def fixed_steps(dynamics: Any) -> bool:
    """Whether the relaxations of a model with these dynamics take a fixed number of steps (capturable)."""
    return dynamics.solver in FIXED_STEPS


def solver_option() -> str:
    return option("plain", "fixed-point solver of the free and nudged phases: plain (T1, T2 steps of G) or anderson "
                           "(accelerated, until the residual is at most tol; T1, T2 bound the force evaluations)",
                  choices=tuple(SOLVERS))


def tol_option() -> float:
    return option(1e-6, "residual ||G(x) − x|| relative to the distance from the start at which solver=anderson "
                        "stops", gt=0)


def memory_option() -> int:
    return option(5, "iterates solver=anderson combines", ge=1)
