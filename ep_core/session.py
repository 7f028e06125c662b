"""From names and ``key=value`` settings to objects: what the CLI, benchmarks and tests share.

Seeds: one integer seeds independent generators (ep_core.seeding) for parameter initialisation, batch selection,
masking and the estimators.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ep_core.config import ConfigError, suggest
from ep_core.harness import Comparison, Progress, compare
from ep_core.plugins import Registry
from ep_core.protocols import Batch
from ep_core.seeding import DATA_STREAM, INIT_STREAM, MASK_STREAM, generator

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_settings(pairs: Sequence[str], option: str) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}; malformed pairs and repeated keys are errors."""
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(option, f"expected KEY=VALUE, got {pair!r}")
        if key in settings:
            raise ConfigError(key, f"given twice in {option}")
        settings[key] = value
    return settings


def split_estimator_settings(settings: Mapping[str, str], estimators: Mapping[str, type]) -> dict[str, dict[str, str]]:
    """Route ``--set`` keys to the estimators that own them.

    ``beta=0.01`` goes to every selected estimator with a ``beta`` field; ``aep.beta=0.01`` to aep alone. A key
    that no selected estimator owns is an error.
    """
    routed: dict[str, dict[str, str]] = {label: {} for label in estimators}
    for key, value in settings.items():
        target, dot, field = key.partition(".")
        if dot:
            if target not in estimators:
                raise ConfigError(key, f"{target!r} is not among the estimators being run"
                                       f"{suggest(target, estimators)}")
            known = {row["name"] for row in estimators[target].Config.describe()}
            if field not in known:
                raise ConfigError(key, f"{target} has no option {field!r}{suggest(field, known)}; "
                                       f"valid: {', '.join(sorted(known)) or 'none'}")
            routed[target][field] = value
            continue
        owners = [label for label, cls in estimators.items()
                  if key in {row["name"] for row in cls.Config.describe()}]
        if not owners:
            every = sorted({row["name"] for cls in estimators.values() for row in cls.Config.describe()})
            raise ConfigError(key, f"no selected estimator has this option{suggest(key, every)}; "
                                   f"valid: {', '.join(every) or 'none'}")
        for label in owners:
            routed[label][key] = value
    return routed


def build_model(registry: Registry, name: str, settings: Mapping[str, Any] | None = None, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    cls = registry.get("model", name).factory
    config = cls.Config.from_mapping(settings or {})
    model = cls(config, generator=generator(seed, INIT_STREAM))
    return model.to(dtype=dtype, device=device)


def build_estimator(registry: Registry, name: str, settings: Mapping[str, Any] | None = None) -> Any:
    cls = registry.get("estimator", name).factory
    return cls(cls.Config.from_mapping(settings or {}))


@dataclass
class Data:
    batch: Batch
    description: dict[str, Any]


def needs_images(model_class: type) -> bool:
    return getattr(model_class, "data", "images") == "images"


def load_images(registry: Registry, data: str = "auto", *, data_dir: str | None = None, download: bool = True,
                warn: Callable[[str], None] | None = None) -> Any:
    """The image dataset named ``data`` ('auto' falls back to 'sample' with one warning)."""
    return registry.get("dataset", data).factory(data_dir=data_dir, download=download, warn=warn)


def build_batch(model, dataset: Any | None, *, batch_size: int = 32, seed: int = 0, requested: str = "auto") -> Data:
    """The batch the model learns from: a random subset of ``dataset``, prepared (masked) by the model; or, for a
    model with ``data = "synthetic"``, the batch it makes itself (``dataset`` is then unused)."""
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    parameter = next(model.parameters())
    if not needs_images(type(model)):
        batch = model.make_batch(batch_size, generator=generator(seed, DATA_STREAM))
        return Data(batch, {"name": "synthetic", "source": f"{type(model).__name__}.make_batch",
                            "batch_size": batch_size})
    images, labels = dataset.batch(batch_size, generator=generator(seed, DATA_STREAM), dtype=parameter.dtype)
    batch = model.prepare_batch(images, labels, generator=generator(seed, MASK_STREAM))
    batch = {k: v.to(parameter.device) for k, v in batch.items()}
    return Data(batch, {**dataset.describe(), "requested": requested, "batch_size": batch_size})


def run_comparison(registry: Registry, estimators: Sequence[str], model_name: str, *,
                   reference: str = "bptt", settings: Mapping[str, str] | None = None,
                   model_settings: Mapping[str, str] | None = None, data: str = "auto",
                   data_dir: str | None = None, batch_size: int = 32, seed: int = 0,
                   dtype: str = "float32", device: str = "cpu", repeats: int = 3, download: bool = True,
                   warn: Callable[[str], None] | None = None, progress: Progress | None = None,
                   dataset: Any | None = None) -> Comparison:
    """Build everything from names and settings, then :func:`ep_core.harness.compare`.

    ``dataset`` reuses images already loaded (a sweep loads them once); otherwise ``data`` is loaded here.
    """
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"{dtype!r} is not valid; valid: {', '.join(DTYPES)}")
    labels = list(dict.fromkeys(estimators))
    if reference in labels:
        labels.remove(reference)
    classes = {label: registry.get("estimator", label).factory for label in [reference, *labels]}
    routed = split_estimator_settings(settings or {}, classes)
    model = build_model(registry, model_name, model_settings, seed=seed, dtype=DTYPES[dtype], device=device)
    for label, cls in classes.items():
        required = getattr(cls, "requires", None)
        if required is not None and not isinstance(model, required):
            raise ConfigError("model", f"{label} needs a {required.__name__}; {model_name} is not one")
    built = {label: cls(cls.Config.from_mapping(routed[label])) for label, cls in classes.items()}
    if dataset is None and needs_images(type(model)):
        dataset = load_images(registry, data, data_dir=data_dir, download=download, warn=warn)
    prepared = build_batch(model, dataset, batch_size=batch_size, seed=seed, requested=data)
    meta = {"model": {"name": model_name, "config": model.config.to_dict()}, "data": prepared.description}
    return compare([(label, built[label]) for label in labels], model, prepared.batch,
                   reference=(reference, built[reference]), seed=seed, repeats=repeats, meta=meta,
                   progress=progress)
