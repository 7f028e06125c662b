"""Diagnostics of the free dynamics: how far the force is from a gradient field, and whether the free
phase reached a stable fixed point.

Notation (DESIGN.md): state x, step ε, relaxation map G(x) = Π(x + εF(x)); the free phase iterates G for T1
steps from ``init_state``; residual r(x) = ||G(x) − x|| / ||x||; J = ∂F/∂x and J_G = ∂G/∂x.

Antisymmetry
------------
Split the force Jacobian at the free end point x* into J = S_J + A_J, S_J = ½(J + Jᵀ), A_J = ½(J − Jᵀ). A
gradient field F = −∇E has J = −∇²E, so A_J = 0, and EP is exact only then. For random directions v (the
state's parts drawn in turn from N(0, I) in float32 with an explicit generator) :func:`antisymmetry` reports,
for each part p of the state and for the whole state,

    a_p(v) = ||(A_J v)_p|| / ||(J v)_p||,      A_J v = ½(Jv − Jᵀv),

as mean and standard deviation over the directions. Jv is a forward-mode jvp of F; Jᵀv one application of
the vjp closure built once at x* (:func:`ep_core.relax.linearize`). a = 0 for a gradient field; a = 1 when J
is purely antisymmetric (a rotation field).

Spectral radius
---------------
ρ(J_G) = max |λ(J_G)| = ρ(J_Gᵀ). A fixed point x* = G(x*) is linearly stable iff ρ(J_G(x*)) < 1, and ρ is
then the asymptotic contraction factor per step of both the free phase and the Neumann adjoint
a ← J_Gᵀa + g. :func:`spectral_radius` sees only u ↦ Au (here A = J_Gᵀ, the cached vjp). k Arnoldi steps from
a random unit q₀ give A Q_k = Q_{k+1} H̄_k, Q orthonormal and H̄_k upper Hessenberg ((k+1)×k); the eigenvalues
θ of the square H_k (Ritz values) converge to A's extreme eigenvalues, and the estimate is the largest |θ|.
A complex pair λ, λ̄ of largest modulus comes out as a pair of Ritz values. How far to trust θ: its residual
||A Q_k y − θ Q_k y|| = |h_{k+1,k}| |y_k|, y the unit eigenvector of H_k.

For comparison the same applications give plain power iteration: A^m q₀ = Q_{m+1} c_m with c₀ = e₀ and
c_{m+1} = H̄_m c_m, so the growth factors ||A^{m+1} q₀|| / ||A^m q₀|| = ||H̄_m c_m|| / ||c_m|| cost no further
applications. The power estimate is their geometric mean over the last half of the k steps. It approaches ρ
when one real eigenvalue dominates, at a speed set by |λ₂|/|λ₁|, and keeps an oscillating O(1/k) error when a
complex pair does.

Fixed-point diagnosis
---------------------
:func:`diagnose_fixed_point` runs the free phase for T = T1 steps, then T more from where it stopped (one
trajectory), and measures r(T), r(2T), r₂ = ||G(G(x)) − x|| / ||x|| and ρ = ρ(J_G), the last two at the end
point x_{2T}. The first row that applies gives the verdict (tol = ``converged_tol``; "falling" means
r(2T) < 0.9·r(T), since a wandering residual moves by a few percent either way):

    r(T) ≤ tol, ρ < 1      converged
    r(T) ≤ tol, ρ ≥ 1      unstable fixed point: reached, but it does not attract, and the Neumann adjoint
                           diverges there (GMRES does not)
    r₂ < r(2T)/100         not converged (period-2 cycle): G∘G nearly fixes x_{2T}, every step overshoots
                           (e.g. a projected state flipping sign); a smaller eps helps. ρ of one step says
                           nothing about a cycle, whose stability is that of J_G(x₂)J_G(x₁).
    ρ ≥ 1, not falling     no stable fixed point nearby: the trajectory is being repelled where it ends. It
                           may still settle elsewhere later (cet, s=1, project=true, Fashion-MNIST, seed 0:
                           repelled at step 240, converged by step 800), so diagnose again with a larger T1
                           before lowering s.
    ρ ≥ 1, falling         not converged (falling, but rho >= 1): passing a saddle, or crawling along a
                           nearly flat direction (ρ ≈ 1); diagnose again with a larger T1
    ρ < 1, falling         not converged (still contracting): more steps will help
    ρ < 1, not falling     not converged (stalled): locally contracting, yet the residual does not fall

ρ is a local statement about x_{2T}. While the dynamics contract it should match the measured residual decay
per step, (r(2T)/r(T))^(1/T), reported as ``rate``.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ep_core.config import ConfigError
from ep_core.krylov import arnoldi_step
from ep_core.protocols import Batch, Equilibrium, NamedState, State
from ep_core.relax import CONVERGED_TOL, free_phase, linearize, norm, relax, relaxation_map, residual, scale, sub

CONVERGED = "converged"
UNSTABLE = "unstable fixed point"
PERIOD_TWO_CYCLE = "not converged (period-2 cycle)"
NO_STABLE_FIXED_POINT = "no stable fixed point nearby"
FALLING_UNSTABLE = "not converged (falling, but rho >= 1)"
CONTRACTING = "not converged (still contracting)"
STALLED = "not converged (stalled)"
VERDICTS = (CONVERGED, UNSTABLE, PERIOD_TWO_CYCLE, NO_STABLE_FIXED_POINT, FALLING_UNSTABLE, CONTRACTING,
            STALLED)
PERIOD_TWO = 0.01
"""G∘G moving the end point this many times less than G does marks a period-2 cycle."""
FALLING = 0.9
"""The residual is falling when r(2T) < FALLING·r(T)."""


def state_names(model, state: State) -> tuple[str, ...]:
    """The model's names for the parts of its state (:class:`~ep_core.protocols.NamedState`), else x0, x1, ..."""
    if not isinstance(model, NamedState):
        return tuple(f"x{i}" for i in range(len(state)))
    names = model.state_names
    if len(names) != len(state):
        raise ValueError(f"{type(model).__name__}.state_names has {len(names)} names for a state of "
                         f"{len(state)} parts; give one name per tensor of init_state")
    return tuple(names)


def _gaussian(shape: torch.Size, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn in float32 on the generator's device, then converted: one seed gives the same directions whatever
    # the model's dtype and device, so float32 and float64 runs differ only by their arithmetic.
    return torch.randn(shape, generator=generator, device=generator.device).to(like)


def _summary(ratios: list[float]) -> dict[str, Any]:
    # A part whose force does not move (Jv_p = 0 for every v) has no defined ratio: None, never NaN.
    if any(math.isnan(r) for r in ratios):
        return {"mean": None, "std": None, "values": [None] * len(ratios)}
    return {"mean": statistics.fmean(ratios), "std": statistics.stdev(ratios), "values": ratios}


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    return float(numerator / denominator) if denominator > 0 else math.nan


def antisymmetry(model, batch: Batch, *, samples: int = 8, generator: torch.Generator,
                 converged_tol: float = CONVERGED_TOL) -> dict[str, Any]:
    """||A_J v|| / ||J v|| at the free end point x*, per state part and for the whole state (module doc).

    Returns ``parts`` (name → ``mean``, ``std``, ``values``), ``whole`` (the same for the whole state),
    ``samples``, and the free phase's ``T1``, ``residual`` and ``converged`` (residual ≤ ``converged_tol``).
    """
    if samples < 2:
        raise ConfigError("samples", f"needs at least 2 random directions for a standard deviation, got "
                                     f"{samples}; use e.g. --samples 8")
    equilibrium = free_phase(model, batch)
    x_star = equilibrium.state
    names = state_names(model, x_star)

    def force(state: State) -> State:
        return model.force(state, batch)

    # Fused attention kernels have no forward-mode derivative; the math backend computes the same attention with
    # plain operations, for the jvp and, so that both sides agree to rounding, for the vjp it is compared with.
    with sdpa_kernel(SDPBackend.MATH):
        return _antisymmetry_at(force, equilibrium, names, samples=samples, generator=generator,
                                converged_tol=converged_tol)


def _antisymmetry_at(force: Callable[[State], State], equilibrium: Equilibrium, names: tuple[str, ...], *, samples: int,
                     generator: torch.Generator, converged_tol: float) -> dict[str, Any]:
    x_star = equilibrium.state
    _, J_transpose = linearize(force, x_star)
    ratios: dict[str, list[float]] = {name: [] for name in names}
    whole: list[float] = []
    with torch.no_grad():
        for _ in range(samples):
            v = tuple(_gaussian(t.shape, t, generator) for t in x_star)
            # A fresh jvp per direction: torch.func.linearize would trace F once, but that takes ~2 s on cet
            # against ~8 ms per jvp.
            with warnings.catch_warnings():
                # torch's first forward-mode call registers its jvp decompositions through the deprecated
                # torch.jit.script and says so; nothing a user of epx can act on.
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
                _, Jv = torch.func.jvp(force, (x_star,), (v,))
            A_v = scale(sub(Jv, J_transpose(v)), 0.5)
            for name, A_v_p, Jv_p in zip(names, A_v, Jv, strict=True):
                ratios[name].append(_ratio(torch.linalg.vector_norm(A_v_p), torch.linalg.vector_norm(Jv_p)))
            whole.append(_ratio(norm(A_v), norm(Jv)))
    return {
        "parts": {name: _summary(values) for name, values in ratios.items()},
        "whole": _summary(whole),
        "samples": samples,
        "T1": equilibrium.steps,
        "residual": equilibrium.residual,
        "converged": equilibrium.residual <= converged_tol,
    }


def spectral_radius(apply: Callable[[State], State], like: State, *, iterations: int,
                    generator: torch.Generator) -> dict[str, Any]:
    """ρ of the linear map ``apply`` on states shaped like ``like``, by Arnoldi (module docstring).

    Returns ``rho`` (the largest |Ritz value|), ``ritz`` (that value, as ``real`` and ``imag``),
    ``ritz_residual``, ``power`` (the power-iteration estimate from the same applications) and
    ``applications``. Stops early when the Krylov space becomes invariant, where the Ritz values are exact.
    """
    if iterations < 1:
        raise ConfigError("iterations", f"must be >= 1, got {iterations}; use e.g. --iterations 50")
    start = _gaussian(torch.Size([sum(t.numel() for t in like)]), like[0], generator)
    basis = [start / torch.linalg.vector_norm(start)]
    columns: list[torch.Tensor] = []
    # A remainder this small against ||A q_j|| is rounding noise: the Krylov space is invariant.
    breakdown = math.sqrt(torch.finfo(start.dtype).eps)
    with torch.no_grad():
        for _ in range(iterations):
            h, w = arnoldi_step(apply, basis, like)
            columns.append(h.double().cpu())
            if h[-1] <= breakdown * torch.linalg.vector_norm(h):
                break
            basis.append(w / h[-1])
    k = len(columns)
    H_bar = torch.zeros(k + 1, k, dtype=torch.float64)
    for j, h in enumerate(columns):
        H_bar[: j + 2, j] = h
    theta, y = torch.linalg.eig(H_bar[:k, :k])
    top = int(torch.argmax(theta.abs()))
    ritz = complex(theta[top])
    ritz_residual = float(H_bar[k, k - 1].abs() * y[k - 1, top].abs())  # eig returns unit eigenvectors
    return {"rho": abs(ritz), "ritz": {"real": ritz.real, "imag": ritz.imag}, "ritz_residual": ritz_residual,
            "power": _power_estimate(H_bar), "applications": k}


def _power_estimate(H_bar: torch.Tensor) -> float:
    """Geometric mean of ||A^{m+1} q₀|| / ||A^m q₀|| over the last half of the steps, from H̄ alone."""
    k = H_bar.shape[1]
    c = torch.ones(1, dtype=H_bar.dtype)
    log_growth = []
    for m in range(k):
        c = H_bar[: m + 2, : m + 1] @ c
        growth = torch.linalg.vector_norm(c)
        if growth == 0:  # A^{m+1} q₀ = 0, and so is every later iterate
            return 0.0
        log_growth.append(float(torch.log(growth)))
        c = c / growth
    return math.exp(statistics.fmean(log_growth[k // 2:]))


def fixed_point_stability(model, batch: Batch, state: State, *, iterations: int = 30,
                          generator: torch.Generator) -> dict[str, Any]:
    """ρ(J_G) at ``state`` (J_Gᵀ has the same spectrum): the fixed point attracts when ρ < 1. ``resolved`` says
    whether Arnoldi has settled ρ on one side of 1 (Ritz residual < |1 − ρ|)."""
    _, J_G_transpose = linearize(relaxation_map(model, batch), state)
    spectral = spectral_radius(J_G_transpose, state, iterations=iterations, generator=generator)
    rho = spectral["rho"]
    return {"spectral_radius": rho, "stable": rho < 1, "resolved": spectral["ritz_residual"] < abs(1 - rho),
            "ritz_residual": spectral["ritz_residual"], "iterations": spectral["applications"]}


def diagnose_fixed_point(model, batch: Batch, *, iterations: int = 50, generator: torch.Generator,
                         converged_tol: float = CONVERGED_TOL) -> dict[str, Any]:
    """Residuals at T1 and 2·T1 along one trajectory, ρ(J_G) at its end, and a verdict (module docstring).

    Returns ``T1``; ``residual_T`` (r at T1: what every estimator sees) and ``residual_2T``; ``rate``, the
    measured residual decay per step from T1 to 2·T1 (None when a residual is 0); ``residual_G2``, r₂ at
    x_{2T}; ``spectral``, the :func:`spectral_radius` result at x_{2T}; ``resolved``, whether that estimate
    has settled on one side of 1 (Ritz residual < |1 − ρ|: a heuristic, exact for normal J_G); ``verdict``,
    one of ``VERDICTS``; ``advice``, a sentence with the remedy; and ``T1_estimate``, the steps that would
    reach ``converged_tol`` at the measured rate (only when still contracting).
    """
    first = free_phase(model, batch)
    T = first.steps
    end = relax(model, batch, first.state, T, phase="free", solver="plain").state
    r_T, r_2T = first.residual, residual(model, batch, end)
    G = relaxation_map(model, batch)
    with torch.no_grad():
        r_G2 = float(norm(sub(G(G(end)), end)) / norm(end))
    _, J_G_transpose = linearize(G, end)
    spectral = spectral_radius(J_G_transpose, end, iterations=iterations, generator=generator)
    rho = spectral["rho"]
    resolved = spectral["ritz_residual"] < abs(1 - rho)
    rate = (r_2T / r_T) ** (1 / T) if r_T > 0 and r_2T > 0 else None
    falling = r_2T < FALLING * r_T
    T1_estimate = None
    if r_T <= converged_tol and rho < 1:
        verdict, advice = CONVERGED, "the free phase reached a stable fixed point"
    elif r_T <= converged_tol:
        verdict = UNSTABLE
        advice = (f"the free phase reached a fixed point, but ρ(J_G) = {rho:.4f} ≥ 1 there: it does not "
                  "attract, and the Neumann adjoint diverges; use --set solver=gmres")
    elif r_G2 < PERIOD_TWO * r_2T:
        verdict = PERIOD_TWO_CYCLE
        advice = (f"G∘G nearly returns to the end point (residual {r_G2:.1e}, against {r_2T:.1e} for G): "
                  "every step overshoots, e.g. a projected state flipping sign; lower eps")
    elif rho >= 1 and not falling:
        verdict = NO_STABLE_FIXED_POINT
        advice = (f"the trajectory is being repelled where it ends (ρ(J_G) = {rho:.4f} ≥ 1, residual not "
                  f"falling); it may settle elsewhere later: diagnose again with --model-set T1={4 * T}, and "
                  "if that fails too, lower the non-conservative scale s")
    elif rho >= 1:
        verdict = FALLING_UNSTABLE
        advice = (f"the residual falls, but ρ(J_G) = {rho:.4f} ≥ 1 where the trajectory ends: it is passing "
                  "a saddle or crawling along a nearly flat direction; diagnose again with a larger T1 "
                  f"(e.g. --model-set T1={4 * T})")
    elif falling:
        verdict = CONTRACTING
        # r(2T) can be exactly 0 in float32, leaving no rate: T more steps are then known to suffice.
        T1_estimate = T + (T if rate is None else math.ceil(math.log(converged_tol / r_T) / math.log(rate)))
        advice = (f"the residual is still falling (ρ(J_G) = {rho:.4f}); about T1={T1_estimate} steps would "
                  f"reach {converged_tol:g} at the measured rate (--model-set T1={T1_estimate})")
    else:
        verdict = STALLED
        advice = (f"ρ(J_G) = {rho:.4f} < 1 where the trajectory ends, yet the residual did not fall by 10% "
                  "from T1 to 2·T1: the dynamics may cycle or drift; lower eps or s")
    if not resolved:
        advice += (f"; ρ is not resolved (Ritz residual {spectral['ritz_residual']:.1e} ≥ |1 − ρ|): raise "
                   "--iterations")
    return {"T1": T, "residual_T": r_T, "residual_2T": r_2T, "rate": rate, "residual_G2": r_G2,
            "spectral": spectral, "resolved": resolved, "verdict": verdict, "advice": advice,
            "T1_estimate": T1_estimate, "converged_tol": converged_tol}
