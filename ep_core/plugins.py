"""Plugins: pluggy hookspecs, entry-point loading that survives broken plugins, and the name registry.

A plugin is any module or object with ``@hookimpl`` functions::

    from ep_core import hookimpl

    @hookimpl
    def register_estimators(register):
        register("myrule", "my_pkg.rule:MyRule", summary="one line for `epx list`")

and is found through the ``epx`` entry-point group (``[project.entry-points.epx] myrule = "my_pkg.hooks"``),
exactly like the built-in estimators. ``register`` takes the object itself or, as here, a reference
``"module:attribute"`` that is imported on first use (:class:`Entry`), so that listing plugins imports none of
their code, nor torch; :func:`registers` builds such a one-name plugin in one line. Entry points are loaded one
at a time; one that fails to import or to register is recorded as failed — name, distribution, error — and
every other plugin still loads. A reference that fails to import is recorded the same way when it is used.

Environment: ``EPX_LOAD_PLUGINS`` is an allow-list of entry-point or distribution names (comma-separated;
set but empty loads none); ``EPX_STRICT_PLUGINS=1`` turns any plugin failure into an error (for CI).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ep_core.errors import PluginError, UnknownNameError

PROJECT = "epx"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

KINDS = ("estimator", "model", "dataset", "command")
HOOKS = {"register_estimators": "estimator", "register_models": "model", "register_datasets": "dataset"}


class Specs:
    """The hooks a plugin may implement. Each receives a ``register(name, factory, *, summary=None)`` callback."""

    @hookspec
    def register_estimators(self, register: Callable[..., None]) -> None:
        """Register gradient estimators: ``register("name", EstimatorClass)``."""

    @hookspec
    def register_models(self, register: Callable[..., None]) -> None:
        """Register models: ``register("name", ModelClass)``; the class takes ``(config, *, generator)``."""

    @hookspec
    def register_datasets(self, register: Callable[..., None]) -> None:
        """Register datasets: ``register("name", loader)``."""

    @hookspec
    def register_commands(self, cli: Any) -> None:
        """Add click commands to the ``epx`` command group."""


@dataclass
class Plugin:
    name: str
    distribution: str
    version: str
    status: str = "ok"
    error: str | None = None
    detail: str | None = None
    registered: list[str] = field(default_factory=list)


def is_reference(target: Any) -> bool:
    """Whether ``target`` is a lazy reference, ``"package.module:attribute"``, rather than the object itself."""
    if not isinstance(target, str):
        return False
    module, sep, attribute = target.partition(":")
    return bool(sep) and all(part.isidentifier() for part in [*module.split("."), *attribute.split(".")])


@dataclass
class Entry:
    """A registered name. ``target`` is the object (a class, a factory function) or a lazy reference to it,
    ``"package.module:attribute"``, imported on the first use of :attr:`factory`: listing names and summaries
    never imports a plugin's implementation (nor torch)."""

    kind: str
    name: str
    target: Any
    summary: str
    plugin: str
    record: Plugin = field(repr=False)
    _loaded: Any = field(default=None, repr=False)

    @property
    def factory(self) -> Any:
        """The registered object (see :meth:`load`)."""
        return self.load()

    def load(self) -> Any:
        """The registered object, imported now if it was registered by reference. A reference that cannot be
        imported is a PluginError naming the plugin and its distribution, recorded in ``epx plugins``."""
        if self._loaded is None:
            if not is_reference(self.target):
                self._loaded = self.target
            else:
                module, _, attribute = self.target.partition(":")
                try:
                    loaded: Any = importlib.import_module(module)
                    for part in attribute.split("."):
                        loaded = getattr(loaded, part)
                except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the host
                    _record_failure(self.record, f"load {self.kind}:{self.name}", exc)
                    raise PluginError(f"{self.kind} {self.name!r} of plugin {self.plugin!r} "
                                      f"({self.record.distribution or 'unknown distribution'}) cannot be loaded: "
                                      f"{self.record.error}") from exc
                self._loaded = loaded
        return self._loaded


def _record_failure(record: Plugin, stage: str, exc: BaseException) -> None:
    record.status = "failed"
    record.error = f"{stage}: {type(exc).__name__}: {exc}"
    record.detail = "".join(traceback.format_exception(exc))


def _summary(factory: Any, summary: str | None) -> str:
    if summary:
        return summary
    if is_reference(factory):
        return ""
    text = getattr(factory, "summary", None) or (factory.__doc__ or "").strip()
    return text.splitlines()[0] if text else ""


def registers(kind: str, name: str, target: str, *, summary: str) -> Any:
    """A plugin that registers one name by reference, for an entry point of its own::

        # my_pkg/hooks.py, the module the entry point names (it imports neither torch nor my_pkg.rule):
        myrule = registers("estimator", "myrule", "my_pkg.rule:MyRule", summary="what it does, in one line")

    ``[project.entry-points.epx] myrule = "my_pkg.hooks:myrule"``. epx's own estimators are registered so.
    """
    hooks = {kind_: hook for hook, kind_ in HOOKS.items()}
    if kind not in hooks:
        raise ValueError(f"registers() takes one of {', '.join(hooks)}, not {kind!r}")
    if not is_reference(target):
        raise ValueError(f"registers() takes a reference 'package.module:attribute', not {target!r}")

    @hookimpl(specname=hooks[kind])
    def register_one(register: Callable[..., None]) -> None:
        register(name, target, summary=summary)

    return types.SimpleNamespace(**{hooks[kind]: register_one})


class Registry:
    """Every registered estimator, model and dataset, and which plugin registered it."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.plugins: list[Plugin] = []
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(Specs)

    def add(self, kind: str, name: str, factory: Any, *, summary: str | None, plugin: Plugin) -> None:
        if not name or not name.replace("-", "_").replace(".", "_").isidentifier():
            raise ValueError(f"invalid {kind} name {name!r}: use letters, digits, '-', '_' or '.'")
        if isinstance(factory, str) and not is_reference(factory):
            raise ValueError(f"{kind} {name!r}: a reference is written 'package.module:attribute', not {factory!r}")
        existing = self.entries[kind].get(name)
        if existing is not None and existing.target is not factory and existing.target != factory:
            raise ValueError(f"{kind} {name!r} is already registered by plugin {existing.plugin!r}")
        self.entries[kind][name] = Entry(kind, name, factory, _summary(factory, summary), plugin.name, plugin)

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self.entries[kind][name]
        except KeyError:
            raise UnknownNameError(kind, name, self.entries[kind]) from None

    def load_all(self) -> list[PluginError]:
        """Import every entry registered by reference; return (and record on the plugins) the failures."""
        failures = []
        for entries in self.entries.values():
            for entry in entries.values():
                try:
                    entry.load()
                except PluginError as exc:
                    failures.append(exc)
        return failures

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    @property
    def failures(self) -> list[Plugin]:
        return [p for p in self.plugins if p.status != "ok"]

    def plugin(self, name: str) -> Plugin:
        for p in self.plugins:
            if p.name == name:
                return p
        raise UnknownNameError("plugin", name, [p.name for p in self.plugins])

    def install(self, obj: Any, *, name: str, distribution: str = "", version: str = "",
                strict: bool = False) -> Plugin:
        """Register a plugin object and run its registration hooks, isolating any failure."""
        record = Plugin(name=name, distribution=distribution, version=version)
        self.plugins.append(record)
        try:
            self.manager.register(obj, name=name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the host
            self._fail(record, "register", exc, strict)
            return record
        for hook, kind in HOOKS.items():
            for impl in getattr(self.manager.hook, hook).get_hookimpls():
                if impl.plugin_name != name:
                    continue
                try:
                    impl.function(register=self._register_callback(kind, record))
                except Exception as exc:  # noqa: BLE001
                    self._fail(record, hook, exc, strict)
        return record

    def _register_callback(self, kind: str, record: Plugin) -> Callable[..., None]:
        def register(name: str, factory: Any, *, summary: str | None = None) -> None:
            self.add(kind, name, factory, summary=summary, plugin=record)
            record.registered.append(f"{kind}:{name}")
        return register

    def _fail(self, record: Plugin, stage: str, exc: BaseException, strict: bool) -> None:
        _record_failure(record, stage, exc)
        if strict:
            raise PluginError(f"plugin {record.name!r} ({record.distribution or 'unknown distribution'}) "
                              f"failed at {record.error}") from exc

    def add_commands(self, cli: Any) -> None:
        """Let plugins add click commands; a failing plugin is recorded, the CLI still works."""
        for impl in self.manager.hook.register_commands.get_hookimpls():
            record = next((p for p in self.plugins if p.name == impl.plugin_name), None)
            before = set(cli.commands)
            try:
                impl.function(cli=cli)
            except Exception as exc:  # noqa: BLE001
                if record is not None:
                    self._fail(record, "register_commands", exc, strict=False)
            if record is not None:
                record.registered += [f"command:{name}" for name in sorted(set(cli.commands) - before)]


def _allowed(entry_point: importlib.metadata.EntryPoint, allow: set[str] | None) -> bool:
    if allow is None:
        return True
    dist = entry_point.dist.name if entry_point.dist is not None else ""
    return entry_point.name in allow or dist in allow


def load(*, plugins: Iterable[tuple[str, Any]] = (), allow: Iterable[str] | None = None,
         strict: bool | None = None, entry_points: bool = True) -> Registry:
    """Build a registry: ep_core's own entries, then every ``epx`` entry point, then ``plugins`` given in-process.

    ``allow`` defaults to ``$EPX_LOAD_PLUGINS`` and ``strict`` to ``$EPX_STRICT_PLUGINS``.
    """
    from ep_core import builtins

    if allow is None and "EPX_LOAD_PLUGINS" in os.environ:
        allow = [n.strip() for n in os.environ["EPX_LOAD_PLUGINS"].split(",") if n.strip()]
    allow_set = None if allow is None else set(allow)
    if strict is None:
        strict = os.environ.get("EPX_STRICT_PLUGINS", "").lower() in ("1", "true", "yes")

    registry = Registry()
    registry.install(builtins, name="ep_core", distribution="epx", version=_version("epx"), strict=True)
    if entry_points:
        seen: set[str] = set()
        for ep in importlib.metadata.entry_points(group=PROJECT):
            if ep.name in seen or not _allowed(ep, allow_set):
                continue
            seen.add(ep.name)
            dist = ep.dist.name if ep.dist is not None else ""
            version = ep.dist.version if ep.dist is not None else ""
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - report, and keep loading the others
                record = Plugin(name=ep.name, distribution=dist, version=version)
                registry.plugins.append(record)
                registry._fail(record, "import", exc, strict)
                continue
            registry.install(module, name=ep.name, distribution=dist, version=version, strict=strict)
    for name, obj in plugins:
        registry.install(obj, name=name, distribution="(in-process)", strict=strict)
    return registry


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
