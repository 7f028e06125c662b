"""Fixed-point solvers for the relaxations, in a plain registry (:data:`SOLVERS`), chosen by the model's dynamics.

Both find x with x = U(x) for a relaxation's update U (the free phase's G, or a nudged phase's G with its drive),
starting from x₀, with at most ``steps`` evaluations of U:

    plain      x_{k+1} = U(x_k), exactly ``steps`` times: the map bptt differentiates and T1, T2 count
    anderson   Anderson acceleration (Walker & Ni 2011, as torchdeq and the DEQ literature use it): with the last
               m iterates x_i and their images u_i = U(x_i), residuals f_i = u_i − x_i, the next iterate is
               x_{k+1} = Σ_i α_i u_i  with  α = argmin ‖Σ_i α_i f_i‖²  subject to  Σ_i α_i = 1,
               solved per sample (each sample's fixed point is its own) from the m×m Gram matrix of the
               normalised f_i/‖f_i‖, regularised by 1e-10; it stops as soon as the residual relative to
               the distance travelled, ‖U(x) − x‖ / ‖U(x) − x₀‖ over the batch, is at most ``tol``, and returns
               U(x) there; when the smallest residual seen has not fallen for :data:`PATIENCE`·m evaluations (the
               rounding floor: cet's nudged phases in float64 stall near 1e-10, plain and accelerated alike), it
               returns the U(x) of that smallest residual.

The residual is measured against the distance from the start, not against ‖x‖: a nudged phase moves x* by O(β),
and EP divides that displacement by β, so its error must be small relative to the displacement itself.

Anderson reaches the fixed point that the plain iteration converges to (when it converges) in far fewer
evaluations; it does not change where the fixed point is, so it applies to the free and nudged phases of every
estimator. It reads the residual back once per evaluation, to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import torch

from ep_core.config import option
from ep_core.protocols import State

CHECK_EVERY = 16
"""Steps between two reads of the finiteness flag: a read makes the host wait for the device, which on a GPU
costs more than the step itself."""
Update = Callable[[State], State]
Solver = Callable[..., tuple[State, int]]

REGULARISATION = 1e-10
PATIENCE = 10


def is_finite(a: State) -> bool:
    # A sum is non-finite whenever any entry is, so this costs one reduction and one host sync per tensor.
    return all(bool(torch.isfinite(ai.sum())) for ai in a)


def iterate(update: Callable[[State], State], start: State, steps: int, *,
            diverged: Callable[[int], NoReturn]) -> State:
    """x_{t+1} = update(x_t) for ``steps`` steps from ``start``. The entries' sums are accumulated on the device
    (an inf or NaN stays one) and read once per :data:`CHECK_EVERY` steps; a chunk whose flag is not finite is
    run again from its start checking every step, and ``diverged(t)`` is called with the first non-finite step
    t. ``update`` must be deterministic, so that the second run retraces the first (a flag that overflowed on
    finite states finds no such step, and the iteration goes on)."""
    x, done = start, 0
    while done < steps:
        chunk = min(CHECK_EVERY, steps - done)
        begin, flag = x, None
        for _ in range(chunk):
            x = update(x)
            total = sum(ai.sum() for ai in x)
            flag = total if flag is None else flag + total
        if not bool(torch.isfinite(flag)):
            x = begin
            for t in range(done + 1, done + chunk + 1):
                x = update(x)
                if not is_finite(x):
                    diverged(t)
        done += chunk
    return x


def plain(update: Update, start: State, steps: int, *, tol: float, memory: int,
          diverged: Callable[[int], NoReturn]) -> tuple[State, int]:
    """``steps`` plain steps (``tol`` and ``memory`` unused): (x_steps, steps)."""
    return iterate(update, start, steps, diverged=diverged), steps


def anderson(update: Update, start: State, steps: int, *, tol: float, memory: int,
             diverged: Callable[[int], NoReturn]) -> tuple[State, int]:
    """Anderson acceleration (module docstring): (U(x) at the first x within ``tol``, evaluations used); at most
    ``steps`` evaluations. ``diverged(k)`` is called at the first evaluation k whose image is not finite."""
    if steps < 1:
        return start, 0
    shapes = [t.shape for t in start]
    batch = shapes[0][0]
    sizes = [t[0].numel() for t in start]

    def flat(state: State) -> torch.Tensor:
        return torch.cat([t.reshape(batch, -1) for t in state], dim=1)

    def unflat(vector: torch.Tensor) -> State:
        return tuple(part.reshape(shape) for part, shape in zip(vector.split(sizes, dim=1), shapes))

    origin = flat(start)

    def evaluate(x: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
        image = flat(update(unflat(x)))
        residual = float(torch.linalg.vector_norm(image - x) / torch.linalg.vector_norm(image - origin).clamp_min(
            torch.finfo(x.dtype).tiny))
        if not bool(torch.isfinite(image.sum())):
            diverged(k)
        # A residual that overflows on finite states is as far from the tolerance as can be, not a divergence.
        return image, residual if residual == residual else float("inf")

    xs, images = [origin], []
    best = (float("inf"), origin, 0)
    for k in range(1, steps + 1):
        image, residual = evaluate(xs[-1], k)
        images.append(image)
        if residual <= tol:
            return unflat(image), k
        if residual < best[0]:
            best = (residual, image, k)
        if k == steps or k - best[2] > PATIENCE * memory:
            return unflat(best[1]), k
        xs, images = xs[-memory:], images[-memory:]
        if residual == float("inf"):  # the residuals' norms overflow: no mixing, a plain step
            xs.append(image)
            continue
        # f_i = d_i·f̂_i with unit f̂_i: the Gram matrix of the f̂_i has a unit diagonal, so the newest residuals,
        # orders of magnitude smaller than the oldest, are not lost below the regularisation.
        residuals = torch.stack([u - x for u, x in zip(images, xs)], dim=1).double()     # B × n_hist × n
        sizes_f = torch.linalg.vector_norm(residuals, dim=2).clamp_min(torch.finfo(torch.float64).tiny)
        unit = residuals / sizes_f[:, :, None]
        count = len(xs)
        system = torch.zeros(batch, count + 1, count + 1, dtype=torch.float64, device=image.device)
        system[:, 0, 1:] = system[:, 1:, 0] = 1 / sizes_f
        system[:, 1:, 1:] = unit @ unit.transpose(1, 2) + REGULARISATION * torch.eye(
            count, dtype=torch.float64, device=image.device)
        rhs = torch.zeros(batch, count + 1, 1, dtype=torch.float64, device=image.device)
        rhs[:, 0] = 1
        alpha = (torch.linalg.solve(system, rhs)[:, 1:, 0] / sizes_f).to(image.dtype)     # B × n_hist, Σ α = 1
        xs.append((alpha[:, :, None] * torch.stack(images, dim=1)).sum(dim=1))
    raise AssertionError("the loop returns at its last evaluation")


SOLVERS: dict[str, Solver] = {"plain": plain, "anderson": anderson}


def solver_option() -> str:
    return option("plain", "fixed-point solver of the free and nudged phases: plain (T1, T2 steps of G) or anderson "
                           "(accelerated, until the residual is at most tol; T1, T2 bound the force evaluations)",
                  choices=tuple(SOLVERS))


def tol_option() -> float:
    return option(1e-6, "residual ||G(x) − x|| relative to the distance from the start at which solver=anderson "
                        "stops", gt=0)


def memory_option() -> int:
    return option(5, "iterates solver=anderson combines", ge=1)
