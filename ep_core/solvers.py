"""Fixed-point solvers for the relaxations, in a plain registry (:data:`SOLVERS`), chosen by the model's dynamics.

Both find x with x = U(x) for a relaxation's update U (the free phase's G, or a nudged phase's G with its field),
starting from x₀, with at most ``steps`` evaluations of U:

    plain      x_{k+1} = U(x_k), exactly ``steps`` times: the map bptt differentiates and T1, T2 count
    anderson   Anderson acceleration (Walker & Ni 2011, as torchdeq and the DEQ literature use it), per sample
               (each sample's fixed point is its own): with residuals f = U(x) − x, mixed points y = x + b·f and
               the last m iterates,
                   x_{k+1} = Σ_j α_j y_j   with   α = argmin ‖Σ_j α_j f_j‖²  subject to  Σ_j α_j = 1,
               solved from the m×m Gram matrix of the unit f_j/‖f_j‖, regularised by 1e-10. The mixing b is the
               step length along f that the map's first secant asks for, b = −⟨ΔX, ΔF⟩/‖ΔF‖² after one plain
               step (within [1/10, 10]; the same for the whole phase): the plain iteration's step ε is what T1,
               T2 and bptt are defined by, not the length that suits an accelerated solver, and with b = 1 lm's
               free phase needed 27 evaluations to 1e-6 where it needs 17 (b ≈ 4.5, the step 1/(1 + s·c) its
               linear part asks for). Where the residual then stops halving (:data:`SECANT_PATIENCE`), the
               secant's b was too long for modes the first residual hardly carried, and the phase goes on from
               its best point with b = 1. It stops as soon as the residual relative to the distance travelled,
               ‖U(x) − x‖ / ‖U(x) − x₀‖ over the batch, is at most ``tol``, or once ‖U(x) − x‖ is within one
               rounding of the state, ε·‖U(x)‖ with ε the dtype's machine epsilon, where a smaller residual is
               no longer a better fixed point (float32 resolves a nudged phase's O(β) displacement only to about
               ε₃₂·‖x*‖ / ‖x − x*‖: 2.8e-5 for lm's); and returns U(x) there. When the smallest residual seen
               has not halved in :data:`PATIENCE`·m evaluations (:data:`STALL`: a residual stuck above the
               state's resolution), it returns the U(x) of that smallest residual, not converged.

The residual is measured against the distance from the start (or from an ``origin`` the caller names: x* for a
nudged phase started elsewhere), not against ‖x‖: a nudged phase moves x* by O(β), and EP divides that
displacement by β, so its error must be small relative to the displacement itself.

Anderson reaches the fixed point that the plain iteration converges to (when it converges) in far fewer
evaluations; it does not change where the fixed point is, so it applies to the free and nudged phases of every
estimator. It reads the residual back once per evaluation, to stop.

On a CPU an evaluation of the solver's own costs its memory traffic: a pass over the state is 20–40 µs on lm's
16 × 8192 when the force has just evicted it from the cache, so the solver writes each residual and mixed point
straight into its ring buffers and reads the norms it stops on off the Gram product's diagonal (lm: 0.6 ms of
bookkeeping per evaluation, against 1.4 ms for a free step).
"""

from __future__ import annotations

import math
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
    """Whether the residual reached the tolerance, or the state's resolution where that is coarser: False where the
    solver stopped on its bound of evaluations, or where its residual stopped falling; None for a solver without a
    tolerance (plain)."""
    residual: float | None = None
    """The relative residual of the returned state (None for plain): above the tolerance where the solver stopped
    at the state's resolution or short of convergence."""


Solver = Callable[..., Solved]

REGULARISATION = 1e-10
MIXING_LIMIT = 10.0
"""The bound on Anderson's mixing b and on 1/b (:func:`_mixing`)."""
SECANT_PATIENCE = 2
"""Where the smallest residual has not halved in SECANT_PATIENCE·m evaluations, Anderson goes back to that point
with b = 1 and a cleared history, once per phase: a secant taken along the first residual can ask for a step too
long for modes that residual hardly carried (cet's −β phase, started from the reflection of the +β one, whose
residual lies in few modes: b ≈ 6.6 there, 2.5 in the +β phase, and the phase stalled at 5.6e-6 where b = 1
converges; a linear map with a stiff and a soft half, started along the soft half, crept for 186 evaluations)."""
PATIENCE = 10
STALL = 0.5
"""Anderson stops when its smallest residual has not fallen below STALL times what it was PATIENCE·m evaluations
earlier: where the residual stalls above the state's resolution (an update whose own error is larger than its
rounding), waiting for any new smallest value would spend the whole bound for nothing."""


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
    """Anderson acceleration (module docstring): U(x) at the first x whose residual is within ``tol`` or the
    state's resolution, converged, or else U(x) at the smallest residual seen, not converged; at most ``steps``
    evaluations. The residual is relative to the distance from ``origin`` (default: ``start``). ``diverged(k)`` is
    called at the first evaluation k whose image is not finite.

    The last ``memory`` residuals f_j and mixed points y_j = x_j + b·f_j are written straight into two ring
    buffers (batch × memory × n, in the state's dtype); an evaluation then makes one batched product over each,
    for the Gram matrix and for the next iterate: on a CPU it is this memory traffic, not the arithmetic, that the
    solver costs."""
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
    reference_size = float(torch.linalg.vector_norm(reference))
    # Row 0: U(x) − reference, the distance travelled; rows 1 … memory: the ring of residuals f_j. One product of
    # the rows written so far gives the residuals' Gram matrix and, on its diagonal, both norms the stopping rule
    # reads, without a pass of their own.
    rows = torch.empty(batch, memory + 1, x.shape[1], dtype=x.dtype, device=x.device)
    moved_by, residuals = rows[:, 0], rows[:, 1:]
    mixed = torch.empty_like(residuals)
    resolution, tiny = torch.finfo(x.dtype).eps, torch.finfo(x.dtype).tiny
    mixing: torch.Tensor | None = None    # b, one per sample (batch × 1), from the first two residuals of a run
    secant = True                         # b from the secant, until the residual stops halving (SECANT_PATIENCE)
    best: tuple[float, torch.Tensor] = (float("inf"), x)
    smallest: list[float] = []   # the smallest residual after each evaluation
    stored = 0                   # residuals in the ring since the last plain step

    def stalled(patience: int) -> bool:
        """Whether the smallest residual has not fallen below STALL times what it was patience·memory evaluations
        ago."""
        window = patience * memory
        return len(smallest) > window and smallest[-1] > STALL * smallest[-1 - window]

    for k in range(1, steps + 1):
        image = flat(update(unflat(x)))
        slot, count = stored % memory, min(stored + 1, memory)
        f = torch.sub(image, x, out=residuals[:, slot])
        torch.sub(image, reference, out=moved_by)
        products = torch.bmm(rows[:, :1 + count], rows[:, :1 + count].transpose(1, 2)).double()
        f_size, moved = products[:, 1 + slot, 1 + slot].sum().sqrt(), products[:, 0, 0].sum().sqrt()
        f_size, moved = torch.stack([f_size, moved]).tolist()
        if not math.isfinite(f_size) and not bool(torch.isfinite(image).all()):
            diverged(k)
        moved = max(moved, tiny)
        residual = f_size / moved
        residual = residual if residual == residual else float("inf")  # an overflow on finite states is not NaN
        # Where f is within one rounding of the state (‖f‖ ≤ ε·‖U(x)‖, tested on the bound ‖reference‖ + moved
        # first, to read ‖U(x)‖ only when it can matter), no smaller residual means a better fixed point.
        if residual <= tol or (residual < float("inf") and f_size <= resolution * (reference_size + moved)
                               and f_size <= resolution * float(torch.linalg.vector_norm(image))):
            return Solved(unflat(image), k, True, residual)
        if residual < best[0]:
            best = (residual, image)
        smallest.append(best[0])
        if k == steps or stalled(PATIENCE):
            return Solved(unflat(best[1]), k, False, best[0])
        if residual == float("inf"):  # the residuals' products overflowed: a plain step, the history restarted
            residuals[:, 0] = f
            x, mixing, stored = image, None, 1
            continue
        if secant and mixing is not None and stalled(SECANT_PATIENCE):
            # The secant's b is too long for modes its first step hardly saw: again from the best point, with the
            # history cleared and the plain step's length.
            x, mixing, stored, secant = best[1], None, 0, False
            continue
        stored += 1
        if stored == 1:  # a plain step, x' = U(x) = x + f, so that the next residual gives b
            x = image
            continue
        if mixing is None:
            first = residuals[:, slot - 1]
            mixing = _mixing(first, f - first) if secant else torch.ones_like(f[:, :1])
            torch.addcmul(x, first, mixing - 1, out=mixed[:, slot - 1])    # y of the plain step's x, which is x − f
        torch.addcmul(x, f, mixing, out=mixed[:, slot])
        alpha = _coefficients(products[:, 1:, 1:]).to(x.dtype)
        x = torch.bmm(alpha[:, None, :], mixed[:, :count])[:, 0]
    raise AssertionError("the loop returns at its last evaluation")


def _coefficients(gram: torch.Tensor) -> torch.Tensor:
    """α = argmin ‖Σ_j α_j f_j‖² subject to Σ_j α_j = 1, per sample, from the Gram matrix of the f_j (batch × m ×
    m, float64). In the unit residuals f̂_j = f_j/ℓ_j, α_j ∝ z_j/ℓ_j with (Ĝ + λI)z = 1/ℓ: scaled so that the newest
    residuals, orders of magnitude smaller than the oldest, are not lost below the regularisation λ
    (:data:`REGULARISATION`). The right-hand side is divided by its largest entry, which leaves α as it is and
    keeps every product finite where a sample's residual came out exactly zero (it reached its fixed point before
    the batch did: 1/ℓ is then 1/√tiny, and that residual takes all the weight)."""
    inverse_lengths = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
    unit = gram * inverse_lengths[:, :, None] * inverse_lengths[:, None, :]
    unit.diagonal(dim1=1, dim2=2).add_(REGULARISATION)
    weights = inverse_lengths / inverse_lengths.amax(dim=1, keepdim=True)
    z = torch.linalg.solve(unit, weights[:, :, None])[:, :, 0] * weights
    return z / z.sum(dim=1, keepdim=True)


def _mixing(f: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    """b = −⟨ΔX, ΔF⟩ / ‖ΔF‖² per sample, from a plain step (ΔX = f₁, ΔF = f₂ − f₁): the step length along f that
    the map's own secant asks for, within [1/MIXING_LIMIT, MIXING_LIMIT]; 1, the plain step, where the secant says
    nothing (a first step that did not reduce the residual, or no change)."""
    along = -torch.linalg.vecdot(f, difference)
    length = torch.linalg.vecdot(difference, difference)
    b = along / length.clamp_min(torch.finfo(f.dtype).tiny)
    usable = (along > 0) & torch.isfinite(b)
    return torch.where(usable, b.clamp(1 / MIXING_LIMIT, MIXING_LIMIT), torch.ones_like(b))[:, None]


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
                        "stops (or at the state's resolution, ||G(x) − x|| <= eps·||G(x)||, where that is coarser)",
                  gt=0)


def memory_option() -> int:
    return option(5, "iterates solver=anderson combines", ge=1)
