"""bptt / backprop — the exact gradient of what the model computes, the reference every estimator is measured
against: reverse-mode autodiff of ``model.loss``.

For an equilibrium model the loss is the unrolled free phase,

    x₀ = init_state(u),   x_{t+1} = G(x_t) = Π(x_t + εF(x_t)),   t < T1
    ĝ = dC(x_{T1}) / dθ   by reverse-mode autodiff through all T1 steps (and through x₀),

whose end point x_{T1} is also reported (with its residual), so that a comparison can say whether the free
phase converged. For any other model it is ordinary backprop of its loss. The same class is registered as
``bptt`` and, under the name readers of feed-forward work expect, as ``backprop``.

Exact by construction. Cost for an equilibrium model: T1 forward steps plus one backward pass; memory grows
linearly in T1 because every step's activations are kept for the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ep_core.config import Config
from ep_core.protocols import Batch, Equilibrium, EquilibriumModel, GradientEstimate, Model
from ep_core.relax import detach, parameter_gradient, residual, unrolled


@dataclass(frozen=True)
class BPTTConfig(Config):
    """bptt has no knobs: T1 and ε belong to the model."""


class BPTT:
    name: ClassVar[str] = "bptt"
    Config: ClassVar[type[Config]] = BPTTConfig
    requires: ClassVar[type] = Model
    exact_limit: ClassVar[str] = "always: it differentiates the unrolled computation itself"
    conformance_limit: ClassVar[str | None] = None
    # The unroll x ← Π(x + εF) is the same with v·F at step ε/v, and the loss v·C has v times the gradient: models
    # that differ in ε stack (protocols.ForceHomogeneous).
    force_homogeneous: ClassVar[bool] = True

    def __init__(self, config: BPTTConfig | None = None):
        self.config = config or BPTTConfig()

    def capturable(self, model) -> bool:
        """The unrolled free phase is T1 plain steps whatever the model's solver; a feed-forward loss may read
        values back, so only an equilibrium model's is recorded."""
        return isinstance(model, EquilibriumModel)

    def batchable(self, model) -> bool:
        """The unrolled free phase treats samples independently, and a sum of the problems' costs differentiates
        into each problem's gradient; a feed-forward loss may not."""
        return isinstance(model, EquilibriumModel)

    def estimate(self, model, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
        if not isinstance(model, EquilibriumModel):
            return GradientEstimate(grads=parameter_gradient(model, lambda: model.loss(batch)))
        final = {}

        def unrolled_cost() -> torch.Tensor:
            cost, final["state"] = unrolled(model, batch)
            return cost

        grads = parameter_gradient(model, unrolled_cost)
        x_final = detach(final["state"])
        return GradientEstimate(grads=grads, equilibrium=Equilibrium(
            state=x_final, residual=residual(model, batch, x_final), steps=model.dynamics.T1))


class Backprop(BPTT):
    name: ClassVar[str] = "backprop"
