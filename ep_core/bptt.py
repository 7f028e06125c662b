"""bptt — the exact gradient of what the model computes, the reference every estimator is measured against.

    x₀ = init_state(u),   x_{t+1} = G(x_t) = Π(x_t + εF(x_t)),   t < T1
    ĝ = dC(x_{T1}) / dθ   by reverse-mode autodiff through all T1 steps (and through x₀).

Exact by construction. Cost: T1 forward steps plus one backward pass; memory grows linearly in T1 because
every step's activations are kept for the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ep_core.config import Config
from ep_core.protocols import Batch, DivergenceError, EquilibriumModel, GradientEstimate
from ep_core.relax import divergence_remedy, is_finite, parameter_gradient, relaxation_map, residual


@dataclass(frozen=True)
class BPTTConfig(Config):
    """bptt has no knobs: T1 and ε belong to the model."""


class BPTT:
    name: ClassVar[str] = "bptt"
    Config: ClassVar[type[Config]] = BPTTConfig
    requires: ClassVar[type] = EquilibriumModel
    exact_limit: ClassVar[str] = "always: it differentiates the unrolled computation itself"
    conformance_limit: ClassVar[str | None] = None

    def __init__(self, config: BPTTConfig | None = None):
        self.config = config or BPTTConfig()

    def estimate(self, model, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
        steps = model.dynamics.T1
        final = {}

        def unrolled_cost() -> torch.Tensor:
            relaxation_step = relaxation_map(model, batch)
            x = model.init_state(batch)
            for t in range(1, steps + 1):
                x = relaxation_step(x)
                if not is_finite(x):
                    raise DivergenceError("free", t, model.dynamics.eps, divergence_remedy("free", model.dynamics.eps))
            final["state"] = tuple(xi.detach() for xi in x)
            return model.cost(x, batch)

        grads = parameter_gradient(model, unrolled_cost)
        x_final = final["state"]
        return GradientEstimate(
            grads=grads,
            stats={"residual": residual(model, batch, x_final), "force_evals": steps + 1, "T1": steps},
            fixed_point=x_final,
        )
