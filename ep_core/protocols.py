"""The objects every estimator and model agree on.

State is a tuple of tensors. A batch is a dict of tensors that the model itself prepares (``prepare_batch``),
so an estimator never needs to know what is inside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ep_core.config import Config
from ep_core.errors import DivergenceError, EpxError

__all__ = ["Batch", "DivergenceError", "Dynamics", "EpxError", "Estimator", "EquilibriumModel", "GradientEstimate",
           "State", "parameter_groups"]

State = tuple[torch.Tensor, ...]
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Dynamics:
    """Step size and free-phase length: they define the fixed point, so every estimator shares them."""

    eps: float
    T1: int


@runtime_checkable
class EquilibriumModel(Protocol):
    """A dynamical system x' = F(x; θ, u) whose stationary state is the model's output.

    The relaxation map is G(x) = Π(x + ε F(x)); the free phase iterates G for T1 steps from ``init_state``.
    Optional: ``nonconservative(state, batch)`` (the part of F that is not a gradient), ``parameter_groups()``
    (named groups of parameter names, for reports) and ``state_names`` (a name per state tensor, for reports).

    Data: a model with ``data = "images"`` provides ``prepare_batch(images, labels, *, generator) -> Batch``
    (e.g. masking); one with ``data = "synthetic"`` makes its own, ``make_batch(size, *, generator) -> Batch``.
    """

    config: Config

    @property
    def dynamics(self) -> Dynamics: ...

    def init_state(self, batch: Batch) -> State: ...

    def force(self, state: State, batch: Batch) -> State: ...

    def project(self, state: State) -> State: ...

    def cost(self, state: State, batch: Batch) -> torch.Tensor: ...


@dataclass
class GradientEstimate:
    """What an estimator returns: one gradient per named parameter, plus how it was obtained."""

    grads: dict[str, torch.Tensor]
    stats: dict[str, Any] = field(default_factory=dict)
    fixed_point: State | None = None


class Estimator(Protocol):
    """An estimator: a small object with one job, built from its validated config."""

    name: ClassVar[str]
    Config: ClassVar[type[Config]]
    requires: ClassVar[type]
    exact_limit: ClassVar[str]
    conformance_limit: ClassVar[str | None]
    """What ep_core.testing samples to check exactness: "conservative", "any-stable" or None. Optional class
    attributes: ``limit_settings`` (config changes that move the estimator to its exact limit, for the kit),
    ``summary`` (one line for ``epx list``), and methods ``state_dict``/``load_state_dict`` for state kept between
    estimates (saved in ``epx train`` checkpoints)."""
    config: Config

    def estimate(self, model: Any, batch: Batch, *, generator: torch.Generator) -> GradientEstimate: ...


def parameter_groups(model: torch.nn.Module) -> Mapping[str, list[str]]:
    """The model's named parameter groups, or one group per top-level parameter name."""
    groups = getattr(model, "parameter_groups", None)
    if callable(groups):
        return groups()
    return {name: [name] for name, _ in model.named_parameters()}
