"""aep — asymmetric equilibrium propagation (Scurria et al. 2026, arXiv 2602.03670).

Like ep, but each nudged phase gets the extra force −(Jv − Jᵀv), v = x − x*, with J = ∂F/∂x taken at x* and held
fixed:

    ẋ = F(x) − σβ∇ₓC(x) − (Jv − Jᵀv).

Linearised around x*, the nudged dynamics become Jv − (Jv − Jᵀv) − σβg = Jᵀv − σβg, so the nudged shift is
δ = σβJ⁻ᵀg and a = (x⁻ − x⁺)/(2β) → −J⁻ᵀg, the true adjoint. Then, as in ep,

    ĝ = ∂/∂θ [⟨a, F(x*; θ)⟩ + C(x*; θ)].

Exact as β → 0 for any converged, stable fixed point, conservative or not, without a projection (Π = identity;
with one, use adjoint). The free phase is ep's, unchanged.

Computation: Jᵀv is one application of the vjp closure built once at x*; Jv = F(x) − F(x*) + O(|v|²) comes free
from the force the step has already computed (the O(|v|²) = O(β²) error is the same for ±β and cancels in the
centered difference). When the model declares its non-conservative part N (F = −∇E + N), the symmetric −∇²E
drops out of Jv − Jᵀv, so only N is linearised: the correction is −(J_N v − J_Nᵀv), with J_N v = N(x) − N(x*),
which costs one vjp through N instead of one through all of F, plus an N evaluation that a model computing N on
its way to F returns with it (:class:`~ep_core.protocols.SplitsForce`). Without a clip the field needs no N at x
at all, since F(x) − (N(x) − N(x*)) = −∇E(x) + N(x*):

    Φ_σβ(x) = −∇E(x) + N(x*) + J_Nᵀv − σβ∇ₓC(x),

which a model that evaluates −∇E = F − N alone (:class:`~ep_core.protocols.DeclaresConservative`: lm, cet)
computes without its attention, the costliest part of its force.

Option ``clip`` = κ: when ||correction|| > κ·||F(x) − σβ∇ₓC(x)||, rescale the correction to that norm, a guard
for the first steps of a strongly non-conservative model. At the corrected nudged fixed point the correction
cancels the nudged force, ||correction|| = ||nudged force||, so a cap of κ < 1 would pull the estimate back to
ep's and κ = 1 (the seeds' value) sits on that boundary: κ must be ≥ 1, and only κ > 1 leaves the limit exact.
Cost: ep's, plus one vjp application per nudged step (≈ one force evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ep_core.config import Config, option
from ep_core.protocols import (Batch, DeclaresConservative, DeclaresNonconservative, Equilibrium, EquilibriumModel,
                               EstimateStats, GradientEstimate, SplitsForce, State)
from ep_core.relax import (Field, add, contrast, force_pairing, free_phase, linearize, norm, nudged_force, scale,
                           sub)
from ep_core.solvers import fixed_steps


@dataclass(frozen=True)
class AEPStats(EstimateStats):
    vjp_evals: int
    """Vector-Jacobian products of the non-conservative part: one per nudged step."""


@dataclass(frozen=True)
class AEPConfig(Config):
    beta: float = option(0.02, "nudge strength β", gt=0)
    T2: int = option(20, "nudged-phase steps", ge=1)
    centered: bool = option(True, "nudge both ways (±β) instead of one way (+β)")
    clip: float | None = option(None, "κ: cap ||correction|| at κ·||nudged force|| (none: no cap); κ ≤ 1 "
                                      "biases the estimate toward ep's", ge=1, optional=True)


class AEP:
    name: ClassVar[str] = "aep"
    Config: ClassVar[type[Config]] = AEPConfig
    requires: ClassVar[type] = EquilibriumModel
    exact_limit: ClassVar[str] = ("any converged stable fixed point (conservative or not), no projection, β → 0, "
                                  "clip none or κ > 1")
    conformance_limit: ClassVar[str | None] = "any-stable"
    # κ = 1 sits on the boundary where the cap binds at the corrected fixed point (module docstring): measured on the
    # kit's toys, aep(clip=1) reaches a relative error of 0.20 at β = 1e-3, so the limit lifts the cap.
    limit_settings: ClassVar[dict] = {"beta": 1e-3, "T2": 100, "clip": None}
    # β enters only as the nudge −β∇ₓC and the contrast's 1/β (the correction does not involve C), and ĝ is linear
    # in a and C: problems that differ in β stack (protocols.StacksNudge), where they stack at all (no clip).
    nudge_field: ClassVar[str] = "beta"
    # As in ep; the correction −(Jv − Jᵀv) is linear in F's (or N's) Jacobian, so it scales with the force too:
    # models that differ in ε stack (protocols.ForceHomogeneous).
    force_homogeneous: ClassVar[bool] = True

    def __init__(self, config: AEPConfig | None = None):
        self.config = config or AEPConfig()

    def capturable(self, model) -> bool:
        return fixed_steps(model.dynamics)

    def batchable(self, model) -> bool:
        """The clip compares norms over the whole state, and a solver that stops on a tolerance its residual."""
        return self.config.clip is None and fixed_steps(model.dynamics)

    def nudged_fields(self, model, batch: Batch, equilibrium: Equilibrium) -> Callable[[float], Field]:
        """σβ ↦ the field x ↦ F(x) − σβ∇ₓC(x) − (Jv − Jᵀv), v = x − x*, with Jᵀ· the vjp closure cached at x*.

        J is the Jacobian of the model's non-conservative part when it declares one, else of the whole force; a
        model that computes N inside F (:class:`SplitsForce`) gives both from one evaluation, and without a clip a
        model that evaluates F − N alone (:class:`DeclaresConservative`) gives the field without N (module
        docstring).
        """
        force_and_part, part_only = _force_and_part(model, batch)
        x_star = equilibrium.state
        part_at_fixed_point, J_transpose = linearize(part_only, x_star)
        clip = self.config.clip
        if clip is None and isinstance(model, DeclaresConservative):
            def gradient_form(beta: float) -> Field:
                def field(x: State) -> State:
                    minus_grad_E = model.conservative(x, batch)
                    corrected = add(add(minus_grad_E, part_at_fixed_point), J_transpose(sub(x, x_star)))
                    return nudged_force(model, batch, x, corrected, beta)
                return field
            return gradient_form

        def nudged(beta: float) -> Field:
            def field(x: State) -> State:
                force, part = force_and_part(x)
                nudged = nudged_force(model, batch, x, force, beta)
                v = sub(x, x_star)
                Jv = sub(part, part_at_fixed_point)
                correction = sub(J_transpose(v), Jv)
                if clip is not None:
                    # On the device: a host comparison here would make every nudged step wait for the GPU.
                    limit, size = clip * norm(nudged), norm(correction)
                    correction = scale(correction, torch.where(size > limit, limit / size, torch.ones_like(size)))
                return add(nudged, correction)
            return field

        return nudged

    def estimate(self, model, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
        cfg = self.config
        equilibrium = free_phase(model, batch)
        a = contrast(model, batch, equilibrium, beta=cfg.beta, steps=cfg.T2, centered=cfg.centered,
                     nudged=self.nudged_fields(model, batch, equilibrium))
        nudged_steps = cfg.T2 * (2 if cfg.centered else 1)
        return GradientEstimate(
            grads=force_pairing(model, batch, equilibrium.state, a),
            equilibrium=equilibrium,
            stats=AEPStats(vjp_evals=nudged_steps),
        )


def _force_and_part(model, batch: Batch) -> tuple[Callable[[State], tuple[State, State]], Callable[[State], State]]:
    """(x ↦ (F(x), P(x)), x ↦ P(x)), P the part aep linearises: N where the model declares it (from F's own
    evaluation where it splits its force), else F itself."""
    if not isinstance(model, DeclaresNonconservative):
        def whole(x: State) -> tuple[State, State]:
            force = model.force(x, batch)
            return force, force
        return whole, lambda x: model.force(x, batch)

    def part(x: State) -> State:
        return model.nonconservative(x, batch)
    if isinstance(model, SplitsForce):
        return (lambda x: model.split_force(x, batch)), part
    return (lambda x: (model.force(x, batch), part(x))), part
