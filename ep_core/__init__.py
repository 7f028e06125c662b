"""ep_core — protocols, plugins, relaxation primitives, the bptt reference and the comparison harness of epx."""

from ep_core.config import Config, ConfigError, option
from ep_core.plugins import hookimpl, hookspec, load
from ep_core.protocols import (Batch, DivergenceError, Dynamics, EpxError, EquilibriumModel, GradientEstimate,
                               State)

__all__ = [
    "Batch", "Config", "ConfigError", "DivergenceError", "Dynamics", "EpxError", "EquilibriumModel",
    "GradientEstimate", "State", "hookimpl", "hookspec", "load", "option",
]
