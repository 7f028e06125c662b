"""ep_core — protocols, plugins, relaxation primitives, the bptt reference and the comparison harness of epx.

Importing ep_core is cheap: the names that need torch (the protocols) are imported on first use, so that a plugin's
hooks module (``from ep_core import hookimpl``) and the command line's --help never load torch."""

from typing import Any

from ep_core.config import Config, ConfigError, option
from ep_core.errors import DivergenceError, EpxError
from ep_core.plugins import hookimpl, hookspec, load, registers

_FROM_PROTOCOLS = ("Batch", "Dynamics", "EquilibriumModel", "GradientEstimate", "State")

__all__ = [
    "Batch", "Config", "ConfigError", "DivergenceError", "Dynamics", "EpxError", "EquilibriumModel",
    "GradientEstimate", "State", "hookimpl", "hookspec", "load", "option", "registers",
]


def __getattr__(name: str) -> Any:
    if name in _FROM_PROTOCOLS:
        from ep_core import protocols

        return getattr(protocols, name)
    raise AttributeError(f"module 'ep_core' has no attribute {name!r}")
