"""From names and ``key=value`` settings to objects: what the CLI, benchmarks and tests share.

Seeds: one integer seeds independent generators (ep_core.seeding) for parameter initialisation, batch selection,
masking and the estimators.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ep_core.config import ConfigError, suggest
from ep_core.harness import Case, Comparison, MeasurementCache, Progress, compare_cases
from ep_core.plugins import Registry
from ep_core.protocols import Batch, DataSpec, Dataset, EquilibriumModel, Model, SyntheticData
from ep_core.seeding import DATA_STREAM, INIT_STREAM, MASK_STREAM, check_seed, generator

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


def _fields(config_owner: type) -> set[str]:
    return {row["name"] for row in config_owner.Config.describe()}


def split_estimator_settings(settings: Mapping[str, str], estimators: Mapping[str, type],
                             model_class: type | None = None) -> dict[str, dict[str, str]]:
    """Route ``--set`` keys to the estimators that own them.

    ``beta=0.01`` goes to every selected estimator with a ``beta`` field; ``aep.beta=0.01`` to aep alone. A key
    that no selected estimator owns is an error; when it is an option of ``model_class`` the error says so.
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
            if model_class is not None and key in _fields(model_class):
                raise ConfigError(key, f"{key} is an option of the model, not of an estimator: give it as "
                                       f"--model-set {key}={value}")
            every = sorted({row["name"] for cls in estimators.values() for row in cls.Config.describe()})
            raise ConfigError(key, f"no selected estimator has this option{suggest(key, every)}; "
                                   f"valid: {', '.join(every) or 'none'}")
        for label in owners:
            routed[label][key] = value
    return routed


def check_model_settings(model_class: type, settings: Mapping[str, Any], estimators: Mapping[str, type]) -> None:
    """Validate ``--model-set`` values before any data are loaded; a key that belongs to one of the
    ``estimators`` instead is named as such."""
    for key, value in settings.items():
        if key not in _fields(model_class) and any(key in _fields(cls) for cls in estimators.values()):
            raise ConfigError(key, f"{key} is an option of the estimators, not of the model: give it as "
                                   f"--set {key}={value}")
    model_class.Config.from_mapping(settings)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(text: str | torch.device) -> torch.device:
    """The torch device ``text`` names, if epx can compute on it here: a known type (cpu, cuda, mps), present,
    with an index in range. A ConfigError ("device") otherwise."""
    if isinstance(text, torch.device):
        device = text
    else:
        try:
            device = torch.device(str(text).strip())
        except (RuntimeError, ValueError):
            raise ConfigError("device", f"{text!r} is not a device; valid: cpu, cuda, cuda:N, mps") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError("device", f"epx computes on {', '.join(DEVICE_TYPES)}, not on {device.type!r}"
                                    + (" (meta tensors hold no data)" if device.type == "meta" else ""))
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise ConfigError("device", f"{text!r}: the CPU takes no device index; use cpu")
        return torch.device("cpu")
    if device.type == "mps":
        if not (torch.backends.mps.is_available()):
            raise ConfigError("device", f"{text!r} requested but MPS (Apple GPU) is not available here")
        return device
    if not torch.cuda.is_available():
        raise ConfigError("device", f"{text!r} requested but CUDA is not available here")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError("device", f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CUDA: free memory; CPU: the kernel's MemAvailable), or
    None when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def samples_in(model: Model, dataset: Any | None) -> int | None:
    """How many distinct samples ``dataset`` offers ``model`` (images; windows of the model's context for text);
    None for a model that makes its own data."""
    if model.data.kind == "synthetic" or dataset is None:
        return None
    if model.data.kind == "text":
        return max(0, len(dataset) - model.data.sample_shape(model.config)[0])
    return len(dataset)


def check_batch_size(model: torch.nn.Module, dataset: Any | None, batch_size: int, *,
                     held_out: Any | None = None) -> None:
    """Refuse, before anything large is allocated, a batch the data cannot fill or the device cannot hold.

    The memory needed is estimated from one sample: its batch tensors and three copies of its relaxation state
    (the state, its force, the next state) per sample, a lower bound of what any estimator needs."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be an integer >= 1, got {batch_size!r}")
    for split, data in (("training", dataset), ("held-out", held_out)):
        available = samples_in(model, data)
        if available is not None and batch_size > available:
            unit = "windows of context characters" if model.data.kind == "text" else "samples"
            raise ConfigError("batch_size", f"{batch_size} is larger than the {split} data of {data.name!r}, "
                                            f"which has {available} {unit}; use --batch-size {available} or less")
    parameter = next(model.parameters())
    one = draw_batch(model, dataset, 1, data=generator(0, DATA_STREAM), mask=generator(0, MASK_STREAM))
    per_sample = _bytes(one.values())
    if isinstance(model, EquilibriumModel):
        with torch.no_grad():
            per_sample += 3 * _bytes(model.init_state(one))
    free = available_memory(parameter.device)
    if free is not None and per_sample * batch_size > free:
        raise ConfigError("batch_size", f"{batch_size} samples need at least {_gib(per_sample * batch_size)} "
                                        f"({per_sample} bytes per sample for the batch and the relaxation state), "
                                        f"more than the {_gib(free)} available on {parameter.device}; use a "
                                        f"smaller --batch-size")


def build_model(registry: Registry, name: str, settings: Mapping[str, Any] | None = None, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                dataset: Any | None = None) -> torch.nn.Module:
    """The model ``name`` with ``settings``, initialised from the seed's INIT stream. The settings its data imply
    (``DataSpec.from_data``: lm's vocabulary size) come first, under the user's own."""
    cls = registry.get("model", name).factory
    implied = cls.data.config_from_data(dataset)
    config = cls.Config.from_mapping({**implied, **(settings or {})})
    model = cls(config, generator=generator(seed, INIT_STREAM))
    return model.to(dtype=dtype, device=resolve_device(device))


def build_estimator(registry: Registry, name: str, settings: Mapping[str, Any] | None = None) -> Any:
    cls = registry.get("estimator", name).factory
    return cls(cls.Config.from_mapping(settings or {}))


def build_estimators(registry: Registry, names: Sequence[str], settings: Mapping[str, str] | None = None,
                     model_class: type | None = None) -> dict[str, Any]:
    """Each of ``names`` (once, in order) built with its share of ``settings`` (:func:`split_estimator_settings`)."""
    classes = {label: registry.get("estimator", label).factory for label in dict.fromkeys(names)}
    routed = split_estimator_settings(settings or {}, classes, model_class)
    return {label: cls(cls.Config.from_mapping(routed[label])) for label, cls in classes.items()}


def check_requires(label: str, estimator_class: type, model: Any, model_name: str) -> None:
    """The estimator's ``requires`` protocol must hold for the model (usage error otherwise)."""
    required = estimator_class.requires
    if not isinstance(model, required):
        raise ConfigError("model", f"{label} needs a {required.__name__}; {model_name} is not one")


@dataclass
class Data:
    batch: Batch
    description: dict[str, Any]


def load_data(registry: Registry, data: str = "auto", *, spec: DataSpec, data_dir: str | None = None,
              download: bool = True, warn: Callable[[str], None] | None = None, split: str = "train",
              shape: tuple[int, ...] | None = None) -> Any:
    """The dataset named ``data`` for a model whose data are ``spec``; None for a model that makes its own data.

    ``shape`` is the sample shape the model asks for (``spec.sample_shape(config)``): the generated 'sample' is
    made in it (None: the sample's own, 1×28×28 images). 'auto' is resolved here, since only the model knows its
    datasets: each of ``spec.datasets`` in turn through the registry, the next one when a dataset can be neither
    found nor downloaded (DataNotFound), and at the end the registered 'sample' with ONE warning naming every
    place searched. A corrupt or mismatching file stops with its error instead.
    """
    from ep_core.datasets import AUTO, SAMPLE
    from ep_core.datasets.store import real_or_sample

    if spec.kind == "synthetic":
        return None

    def load(name: str) -> Any:
        return registry.get("dataset", name).factory(data_dir=data_dir, download=download, warn=warn, split=split,
                                                     kind=spec.kind, shape=shape)

    if data == AUTO:
        dataset = real_or_sample([lambda name=name: load(name) for name in spec.datasets], lambda: load(SAMPLE),
                                 what=spec.kind, warn=warn)
    else:
        dataset = load(data)
    if not isinstance(dataset, Dataset) or dataset.kind != spec.kind:
        held = dataset.kind if isinstance(dataset, Dataset) else f"a {type(dataset).__name__}"
        raise ConfigError("data", f"{data!r} holds {held}, but the model learns from {spec.kind}; choose a dataset "
                                  f"of {spec.kind} (see `epx list datasets`) or --data auto")
    return dataset


def draw_batch(model, dataset: Any | None, batch_size: int, *, data: torch.Generator,
               mask: torch.Generator, augment: bool = False) -> Batch:
    """One batch for ``model``: ``batch_size`` samples of ``dataset`` drawn with the ``data`` generator and
    prepared (e.g. masked) with ``mask``; or, for a synthetic-data model, the batch it makes from ``data``.
    ``augment``: images get the dataset's training augmentation (seeded crop and flip, from ``data``)."""
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    parameter = next(model.parameters())
    if model.data.kind == "synthetic":
        if not isinstance(model, SyntheticData):
            raise ConfigError("data", f"{type(model).__name__} declares synthetic data but has no make_batch")
        return model.make_batch(batch_size, generator=data)
    if model.data.kind == "text":
        if augment:
            raise ConfigError("augment", "augmentation is for images; text windows have none")
        inputs, targets = dataset.batch(batch_size, context=model.data.sample_shape(model.config)[0], generator=data)
    else:
        inputs, targets = dataset.batch(batch_size, generator=data, dtype=parameter.dtype, augment=augment,
                                        normalize=model.data.normalize)
    batch = model.prepare_batch(inputs, targets, generator=mask)
    return {k: v.to(parameter.device) for k, v in batch.items()}


def build_batch(model, dataset: Any | None, *, batch_size: int | None = None, seed: int = 0,
                requested: str = "auto") -> Data:
    """The batch a comparison measures on, drawn from the seed's DATA and MASK streams."""
    batch_size = model.data.batch_size if batch_size is None else batch_size
    check_batch_size(model, dataset, batch_size)
    return _seeded_batch(model, dataset, batch_size, seed=seed, requested=requested)


def _seeded_batch(model, dataset: Any | None, batch_size: int, *, seed: int, requested: str) -> Data:
    batch = draw_batch(model, dataset, batch_size, data=generator(seed, DATA_STREAM),
                       mask=generator(seed, MASK_STREAM))
    if dataset is None:
        return Data(batch, {"name": "synthetic", "source": f"{type(model).__name__}.make_batch",
                            "batch_size": batch_size})
    description = dataset.describe()
    normalized = model.data.normalize and "normalization" in description
    return Data(batch, {**description, "requested": requested, "batch_size": batch_size, "normalized": normalized})


def model_data(registry: Registry, model_class: type, data: str = "auto",
               model_settings: Mapping[str, str] | None = None, *, split: str = "train", data_dir: str | None = None,
               download: bool = True, warn: Callable[[str], None] | None = None) -> Any:
    """:func:`load_data` for ``model_class`` configured with ``model_settings``: its DataSpec, and the sample
    shape it asks for (None for a model that makes its own data)."""
    spec = model_class.data
    config = model_class.Config.from_mapping(model_settings or {})
    shape = None if spec.kind == "synthetic" else spec.sample_shape(config)
    return load_data(registry, data, spec=spec, data_dir=data_dir, download=download, warn=warn, split=split,
                     shape=shape)


@dataclass
class Problem:
    """A model, its data and estimators, built from names by :func:`build_problem`: what compare, sweep, analyze
    and train work on."""

    model_name: str
    model: Model
    estimators: dict[str, Any]
    dataset: Any | None
    """The training data (None: the model makes its own)."""
    held_out: Any | None
    """The test split of the same dataset, when asked for."""
    batch_size: int
    seed: int
    requested: str
    """The data as the user named them ('auto' or a dataset)."""

    def batch(self) -> Data:
        """The batch a comparison measures on, drawn from the seed's DATA and MASK streams."""
        return _seeded_batch(self.model, self.dataset, self.batch_size, seed=self.seed, requested=self.requested)

    def describe(self, data: Data) -> dict[str, Any]:
        return {"model": {"name": self.model_name, "config": self.model.config.to_dict()}, "data": data.description}


def build_problem(registry: Registry, model_name: str, estimators: Sequence[str] = (), *,
                  settings: Mapping[str, str] | None = None, model_settings: Mapping[str, str] | None = None,
                  references: Sequence[str] = (), data: str = "auto", data_dir: str | None = None,
                  download: bool = True, warn: Callable[[str], None] | None = None, batch_size: int | None = None,
                  seed: int = 0, dtype: str = "float32", device: str = "cpu", dataset: Any | None = None,
                  held_out: bool = False) -> Problem:
    """Names and ``key=value`` settings → a :class:`Problem`, every setting validated before any data are loaded.

    ``settings`` (``--set``) are routed among ``estimators``; ``references`` are built with their defaults (train's
    reference is not the estimator being tuned). ``dataset`` reuses data already loaded (a sweep, an analysis
    over model settings); ``held_out`` also loads the test split of the dataset actually used, so that 'auto'
    neither warns twice nor mixes real and generated data. Every estimator's ``requires`` must hold for the model,
    and the batch must fit the data and the device.
    """
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"{dtype!r} is not valid; valid: {', '.join(DTYPES)}")
    check_seed(seed)
    resolve_device(device)
    model_class = registry.get("model", model_name).factory
    built = build_estimators(registry, estimators, settings, model_class)
    built |= {label: build_estimator(registry, label) for label in references if label not in built}
    model_settings = dict(model_settings or {})
    check_model_settings(model_class, model_settings, {label: type(e) for label, e in built.items()})
    if dataset is None:
        dataset = model_data(registry, model_class, data, model_settings, data_dir=data_dir, download=download,
                             warn=warn)
    test = None
    if held_out and dataset is not None:
        used = dataset.name if dataset.name in registry.entries["dataset"] else data
        test = model_data(registry, model_class, used, model_settings, split="test", data_dir=data_dir,
                          download=download, warn=warn)
    model = build_model(registry, model_name, model_settings, seed=seed, dtype=DTYPES[dtype], device=device,
                        dataset=dataset)
    for label, estimator in built.items():
        check_requires(label, type(estimator), model, model_name)
    batch_size = model_class.data.batch_size if batch_size is None else batch_size
    check_batch_size(model, dataset, batch_size, held_out=test)
    return Problem(model_name=model_name, model=model, estimators=built, dataset=dataset, held_out=test,
                   batch_size=batch_size, seed=seed, requested=data)


def run_comparison(registry: Registry, estimators: Sequence[str], model_name: str, *,
                   reference: str = "bptt", settings: Mapping[str, str] | None = None,
                   model_settings: Mapping[str, str] | None = None, data: str = "auto",
                   data_dir: str | None = None, batch_size: int | None = None, seed: int = 0,
                   dtype: str = "float32", device: str = "cpu", repeats: int = 3, download: bool = True,
                   warn: Callable[[str], None] | None = None, progress: Progress | None = None,
                   dataset: Any | None = None, eager: bool = False) -> Comparison:
    """:func:`build_problem`, then :func:`ep_core.harness.compare` on its seeded batch (``eager``: no CUDA graphs).

    ``dataset`` reuses data already loaded (a sweep loads them once); otherwise ``data`` is loaded here.
    """
    return run_comparisons(registry, estimators, model_name, reference=reference, settings=settings,
                           model_settings=model_settings, data=data, data_dir=data_dir, batch_size=batch_size,
                           seeds=[seed], dtype=dtype, device=device, repeats=repeats, download=download, warn=warn,
                           progress=progress, dataset=dataset, eager=eager)[0]


def run_comparisons(registry: Registry, estimators: Sequence[str], model_name: str, *, seeds: Sequence[int],
                    reference: str = "bptt", settings: Mapping[str, str] | None = None,
                    model_settings: Mapping[str, str] | None = None, data: str = "auto",
                    data_dir: str | None = None, batch_size: int | None = None, dtype: str = "float32",
                    device: str = "cpu", repeats: int = 3, download: bool = True,
                    warn: Callable[[str], None] | None = None, progress: Progress | None = None,
                    dataset: Any | None = None, eager: bool = False,
                    stacking: bool | None = None) -> list[Comparison]:
    """One comparison per seed of ``seeds`` — its own model initialisation and batch, the same configuration —
    measured together (:func:`ep_core.harness.compare_cases`: on CUDA, each estimator's problems are one graph,
    stacked or side by side as ``stacking`` says, :class:`ep_core.capture.Runner`). Each comparison's numbers are
    those of a run with that seed alone."""
    if not seeds:
        raise ConfigError("seeds", "give at least one seed")
    return run_problem_comparisons(registry, estimators, model_name,
                                   problems=[(settings or {}, model_settings or {}, seed) for seed in seeds],
                                   reference=reference, data=data, data_dir=data_dir,
                                   batch_size=batch_size, dtype=dtype, device=device, repeats=repeats,
                                   download=download, warn=warn, progress=progress, dataset=dataset, eager=eager,
                                   stacking=stacking)


def run_problem_comparisons(registry: Registry, estimators: Sequence[str], model_name: str, *,
                            problems: Sequence[tuple[Mapping[str, str], Mapping[str, str], int]],
                            reference: str = "bptt", data: str = "auto",
                            data_dir: str | None = None, batch_size: int | None = None, dtype: str = "float32",
                            device: str = "cpu", repeats: int = 3, download: bool = True,
                            warn: Callable[[str], None] | None = None, progress: Progress | None = None,
                            dataset: Any | None = None, eager: bool = False,
                            stacking: bool | None = None,
                            cache: MeasurementCache | None = None) -> list[Comparison]:
    """:func:`run_comparisons` over (estimator settings, model settings, seed) ``problems``: a sweep's grid points
    and their seeds, measured together. Problems that differ only in knobs the model reads from buffers
    (:class:`~ep_core.protocols.StacksKnobs`, lm's and cet's s and c), in a nudge the estimator stacks
    (:class:`~ep_core.protocols.StacksNudge`, ep's and aep's β) or in the model's step size ε where the estimator
    scales with the force (:class:`~ep_core.protocols.ForceHomogeneous`) can run stacked. ``cache`` keeps the
    measurements for later calls (:class:`~ep_core.harness.MeasurementCache`)."""
    if not problems:
        raise ConfigError("seeds", "give at least one seed")
    labels = [label for label in dict.fromkeys(estimators) if label != reference]
    cases = []
    for settings, model_settings, seed in problems:
        problem = build_problem(registry, model_name, [reference, *labels], settings=settings,
                                model_settings=model_settings, data=data, data_dir=data_dir, download=download,
                                warn=warn, batch_size=batch_size, seed=seed, dtype=dtype, device=device,
                                dataset=dataset)
        dataset = problem.dataset
        prepared = problem.batch()
        cases.append(Case(model=problem.model, batch=prepared.batch, seed=seed, estimators=problem.estimators,
                          meta=problem.describe(prepared)))
    return compare_cases(cases, labels, reference=reference, repeats=repeats, progress=progress, eager=eager,
                         stacking=stacking, cache=cache)
