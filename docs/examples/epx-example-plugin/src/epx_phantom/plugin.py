"""phantom — the k-step phantom gradient (Geng et al. 2021, "On training implicit models").

From the free equilibrium x* = G(x*), G(x) = Π(x + εF(x)), unroll k more steps of the damped map with autograd,
starting from x* detached, and differentiate the cost at the end:

    x₀ = x*,    x_{i+1} = (1 − λ)x_i + λG(x_i; θ),    i < k,
    ĝ = dC(x_k; θ)/dθ.

At the fixed point every x_i is x*, so with J_G = ∂G/∂x, J_λ = (1 − λ)I + λJ_G and g = ∇ₓC(x*) this is a
truncated Neumann series of the implicit gradient:

    ĝ = ∂C/∂θ + λ Σ_{i<k} (∂G/∂θ)ᵀ (J_λᵀ)^i g.

Exact limit: at a converged stable fixed point (ρ(J_G) < 1) with λ = 1, the series sums as k → ∞ to
(∂G/∂θ)ᵀ(I − J_Gᵀ)⁻¹g + ∂C/∂θ, the implicit gradient that ``adjoint`` computes, hence bptt's at convergence.
A damping λ < 1 has the same limit, λ(I − J_λᵀ)⁻¹ = (I − J_Gᵀ)⁻¹, reached more slowly; it also converges when
some eigenvalue μ of J_G lies outside the unit circle but has |1 − λ + λμ| < 1. The error decays like ρ(J_λ)^k.
Cost: T1 + 1 forces without a graph, then k forces with one and a backward pass; memory grows with k, not T1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ep_core.config import Config, option
from ep_core.protocols import Batch, DivergenceError, EquilibriumModel, GradientEstimate
from ep_core.relax import add, detach, free_phase, is_finite, parameter_gradient, relaxation_map, scale


@dataclass(frozen=True)
class PhantomConfig(Config):
    steps: int = option(5, "k: steps of G unrolled from x* with autograd", ge=1)
    damping: float = option(1.0, "λ: the unrolled map is x ← (1 − λ)x + λG(x)", gt=0, le=1)


class Phantom:
    name: ClassVar[str] = "phantom"
    Config: ClassVar[type[Config]] = PhantomConfig
    requires: ClassVar[type] = EquilibriumModel
    exact_limit: ClassVar[str] = "converged stable fixed point (ρ(J_G) < 1), steps k → ∞ (exact for any damping)"
    conformance_limit: ClassVar[str | None] = "any-stable"
    limit_settings: ClassVar[dict] = {"steps": 400, "damping": 1.0}

    def __init__(self, config: PhantomConfig | None = None):
        self.config = config or PhantomConfig()

    def estimate(self, model, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
        k, lam = self.config.steps, self.config.damping
        equilibrium = free_phase(model, batch)
        x_star = equilibrium.state
        G = relaxation_map(model, batch)

        def cost_after_k_steps() -> torch.Tensor:
            x = detach(x_star)
            for i in range(1, k + 1):
                x = add(scale(x, 1 - lam), G(x), lam)          # (1 − λ)x + λG(x)
                if not is_finite(x):
                    raise DivergenceError("phantom", i, model.dynamics.eps, "the unrolled map left the fixed "
                                          "point; lower --set damping, or check it with `epx analyze fixed-point`")
            return model.cost(x, batch)

        grads = parameter_gradient(model, cost_after_k_steps)
        return GradientEstimate(grads=grads, equilibrium=equilibrium)
