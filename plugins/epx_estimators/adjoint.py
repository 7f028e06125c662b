"""adjoint — projected implicit differentiation (recurrent backprop, Almeida–Pineda, with a projection).

At the free fixed point x* = G(x*), G(x) = Π(x + εF(x)), differentiate the fixed-point condition: with
J_G = ∂G/∂x = Π'(x* + εF)·(I + εJ) and g = ∇ₓC(x*), the adjoint a solves a = J_Gᵀa + g. It is found by the
Neumann iteration

    a₀ = g,    a_{k+1} = J_Gᵀ a_k + g,    k < Tadj

(or by GMRES on (I − J_Gᵀ)a = g with ``solver=gmres``), and then

    ĝ = ∂/∂θ [⟨a, G(x*; θ)⟩ + C(x*; θ)] = ε⟨Π'ᵀa, ∂F/∂θ⟩ + ∂C/∂θ.

Exact when the free phase has converged to a stable fixed point (spectral radius of J_G below 1) and the
adjoint iteration has converged. bptt through T1 steps sums the same series truncated after T1 − 1 terms and
evaluated along the trajectory instead of at x*, so the two agree when the free phase has converged early.
Cost: one application of the vjp closure of G (built once at x*) per adjoint step; memory independent of T1
and Tadj.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NoReturn

import torch

from ep_core.config import Config, option
from ep_core.krylov import gmres
from ep_core.protocols import Batch, DivergenceError, EquilibriumModel, EstimateStats, GradientEstimate
from ep_core.capture import report
from ep_core.relax import (add, cost_gradient, free_phase, inner, iterate, linearize, norm, parameter_gradient,
                           relaxation_map, sub)
from ep_core.solvers import fixed_steps


@dataclass(frozen=True)
class AdjointStats(EstimateStats):
    vjp_evals: int
    """Products with J_Gᵀ: the solver's, and one for the adjoint's residual."""
    adjoint_residual: float
    """||J_Gᵀa + g − a|| / ||a||: how well a solves the adjoint equation."""


@dataclass(frozen=True)
class AdjointConfig(Config):
    Tadj: int | None = option(None, "adjoint iterations (Neumann) or the Krylov budget (gmres); none: T1", ge=1,
                              optional=True)
    solver: str = option("neumann", "how to solve (I − J_Gᵀ)a = g", choices=("neumann", "gmres"))
    tol: float = option(1e-10, "gmres: stop at this relative residual", gt=0)


class Adjoint:
    name: ClassVar[str] = "adjoint"
    Config: ClassVar[type[Config]] = AdjointConfig
    requires: ClassVar[type] = EquilibriumModel
    exact_limit: ClassVar[str] = "converged stable fixed point and converged adjoint iteration"
    conformance_limit: ClassVar[str | None] = "any-stable"

    def __init__(self, config: AdjointConfig | None = None):
        self.config = config or AdjointConfig()

    def capturable(self, model) -> bool:
        """GMRES stops on its tolerance, so only the Neumann iteration has a fixed amount of work."""
        return self.config.solver == "neumann" and fixed_steps(model.dynamics)

    def estimate(self, model, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
        cfg = self.config
        equilibrium = free_phase(model, batch)
        x_star = equilibrium.state
        budget = cfg.Tadj if cfg.Tadj is not None else model.dynamics.T1
        G = relaxation_map(model, batch)
        _, J_G_transpose = linearize(G, x_star)
        g = cost_gradient(model, batch, x_star)
        with torch.no_grad():
            if cfg.solver == "gmres":
                a, applications = gmres(lambda u: sub(u, J_G_transpose(u)), g, max_iter=budget, tol=cfg.tol)
            else:
                def diverged(step: int) -> NoReturn:
                    raise DivergenceError("adjoint", step, model.dynamics.eps,
                                          "the Neumann series diverges when J_G has an eigenvalue outside the unit "
                                          "circle; try --set solver=gmres, or check the free phase with "
                                          "`epx analyze fixed-point`")

                a = iterate(lambda u: add(J_G_transpose(u), g), g, budget, diverged=diverged)
                applications = budget
            tiny = torch.finfo(a[0].dtype).tiny
            adjoint_residual = report(norm(sub(add(J_G_transpose(a), g), a)) / norm(a).clamp_min(tiny))
        grads = parameter_gradient(model, lambda: inner(a, G(x_star)) + model.cost(x_star, batch))
        return GradientEstimate(
            grads=grads,
            equilibrium=equilibrium,
            stats=AdjointStats(vjp_evals=applications + 1, adjoint_residual=adjoint_residual),
        )

