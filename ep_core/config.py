"""Typed, validated configuration for estimators and models.

A config is a frozen dataclass whose fields are declared with :func:`option`, which records the valid range and
a help line. Validation happens in ``__post_init__``, so a config object that exists is a valid one. Values
arriving as strings (``--set beta=0.1`` on the command line) are parsed by :meth:`Config.from_mapping`, which
also rejects unknown keys with a did-you-mean suggestion: an ignored typo would silently change an experiment.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from ep_core.errors import ConfigError, suggest

__all__ = ["Config", "ConfigError", "describe_range", "option", "suggest"]


def option(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    optional: bool = False,
) -> Any:
    """Declare a config field with its default, help text and valid range.

    ``optional=True`` allows ``None`` (written ``none`` on the command line) in addition to the range.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "optional": optional}
    return dataclasses.field(default=default, metadata=meta)


def describe_range(meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        text = "one of " + ", ".join(str(c) for c in meta["choices"])
    else:
        bounds = []
        if meta.get("gt") is not None:
            bounds.append(f"> {meta['gt']}")
        if meta.get("ge") is not None:
            bounds.append(f">= {meta['ge']}")
        if meta.get("lt") is not None:
            bounds.append(f"< {meta['lt']}")
        if meta.get("le") is not None:
            bounds.append(f"<= {meta['le']}")
        text = " and ".join(bounds) if bounds else "any value"
    if meta.get("optional"):
        text += ", or none"
    return text


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, accepts None) of a field annotation such as ``float | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parse(field: str, kind: type, value: Any) -> Any:
    if not isinstance(value, str):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(field, f"expected {kind.__name__}, got {value!r}")
        return value
    text = value.strip()
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(field, f"expected true or false, got {value!r}")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(field, f"expected {kind.__name__}, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class of every estimator and model config."""

    _types: ClassVar[dict[str, tuple[type, bool]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._types = {}

    @classmethod
    def field_types(cls) -> dict[str, tuple[type, bool]]:
        if not cls._types:
            hints = typing.get_type_hints(cls)
            cls._types = {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}
        return cls._types

    def __post_init__(self) -> None:
        kinds = self.field_types()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, nullable = kinds[f.name]
            meta = f.metadata
            if value is None:
                if nullable and meta.get("optional", True):
                    continue
                raise ConfigError(f.name, f"must be set; valid: {describe_range(meta)}")
            value = _parse(f.name, kind, value)
            object.__setattr__(self, f.name, value)
            _check_range(f.name, value, meta)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None, /, **overrides: Any) -> Self:
        """Build a config from (possibly string) values; unknown keys are errors."""
        merged = {**(values or {}), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        parsed: dict[str, Any] = {}
        kinds = cls.field_types()
        for key, value in merged.items():
            if key not in known:
                valid = f"valid options: {', '.join(sorted(known))}" if known else "it has no options"
                raise ConfigError(key, f"unknown option for {cls.__name__}{suggest(key, known)}; {valid}")
            kind, nullable = kinds[key]
            if nullable and (value is None or isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
                parsed[key] = None
            else:
                parsed[key] = _parse(key, kind, value)
        return cls(**parsed)

    def replace(self, **changes: Any) -> Self:
        return self.from_mapping({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One row per field: name, type, default, valid range, help — for `epx info` and docs."""
        rows = []
        for f in dataclasses.fields(cls):
            kind, nullable = cls.field_types()[f.name]
            rows.append({
                "name": f.name,
                "type": kind.__name__ + (" | None" if nullable else ""),
                "default": f.default,
                "range": describe_range(f.metadata),
                "help": f.metadata.get("help", ""),
            })
        return rows


def _check_range(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None:
        if value not in choices:
            raise ConfigError(name, f"{value!r} is not valid; valid: {describe_range(meta)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"{value!r} is not finite; valid: {describe_range(meta)}")
    checks = (("gt", lambda b: value > b), ("ge", lambda b: value >= b),
              ("lt", lambda b: value < b), ("le", lambda b: value <= b))
    for key, holds in checks:
        bound = meta.get(key)
        if bound is not None and not holds(bound):
            raise ConfigError(name, f"{value!r} is out of range; valid: {describe_range(meta)}")
