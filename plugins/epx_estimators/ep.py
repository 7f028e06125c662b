"""ep — equilibrium propagation (for non-conservative forces: the vector-field rule).

From the free equilibrium x*, relax T2 steps under the nudged force F(x) − σβ∇ₓC(x), σ = ±1, projected like the
free phase, to x^σ. Then

    a = (x⁻ − x⁺) / (2β)          (centered; one-sided: a = (x* − x⁺) / β)
    ĝ = ∂/∂θ [⟨a, F(x*; θ)⟩ + C(x*; θ)].

Why: at a fixed point of F − βg, the nudged shift is δ = βJ⁻¹g (J = ∂F/∂x at x*), so a → −J⁻¹g, while the true
gradient is dC/dθ = ⟨−J⁻ᵀg, ∂F/∂θ⟩. Exact as β → 0 (centered error O(β²), one-sided O(β)) when J is symmetric
(F = −∇E, a conservative model), there is no projection (Π = identity) and x* is a converged, stable fixed
point with T2 long enough to settle.
For non-conservative F, J⁻¹ ≠ J⁻ᵀ and the estimate is biased — which aep corrects.
Cost: T1 + 2·T2 force evaluations (T1 + T2 one-sided), memory independent of T1 and T2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ep_core.config import Config, option
from ep_core.protocols import Batch, EquilibriumModel, GradientEstimate
from ep_core.relax import contrast, force_pairing, free_phase
from ep_core.solvers import fixed_steps


@dataclass(frozen=True)
class EPConfig(Config):
    beta: float = option(0.02, "nudge strength β", gt=0)
    T2: int = option(20, "nudged-phase steps", ge=1)
    centered: bool = option(True, "nudge both ways (±β, O(β²) bias) instead of one way (+β, O(β) bias)")


class EP:
    name: ClassVar[str] = "ep"
    Config: ClassVar[type[Config]] = EPConfig
    requires: ClassVar[type] = EquilibriumModel
    exact_limit: ClassVar[str] = "conservative model (symmetric J), no projection, converged stable fixed point, β → 0"
    conformance_limit: ClassVar[str | None] = "conservative"
    # β enters only as the nudge −β∇ₓC and the contrast's 1/β, and ĝ is linear in a and C: problems that differ in
    # β stack (protocols.StacksNudge).
    nudge_field: ClassVar[str] = "beta"
    # F enters only as the steps' εF and the pairing ⟨a, F⟩, C as the nudge and the pairing: scaled by v at step ε/v,
    # the phases are the same and ĝ is v times larger, so models that differ in ε stack (protocols.ForceHomogeneous).
    force_homogeneous: ClassVar[bool] = True

    def __init__(self, config: EPConfig | None = None):
        self.config = config or EPConfig()

    def capturable(self, model) -> bool:
        return fixed_steps(model.dynamics)

    def batchable(self, model) -> bool:
        """A solver that stops on a tolerance measures the residual over the whole state: only the plain one
        treats problems independently."""
        return fixed_steps(model.dynamics)

    def estimate(self, model, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
        cfg = self.config
        equilibrium = free_phase(model, batch)
        a = contrast(model, batch, equilibrium, beta=cfg.beta, steps=cfg.T2, centered=cfg.centered)
        return GradientEstimate(
            grads=force_pairing(model, batch, equilibrium.state, a),
            equilibrium=equilibrium,
        )

