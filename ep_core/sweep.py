"""Sweeps: one comparison per point of a grid over model and estimator knobs, resumable from its output file.

A sweep is the cartesian product of its axes (``--vary KEY=v1,v2,...``, in the order given) times its seeds. A key
belongs to the model (``s``, ``T1``, ``eps``, ...) or to estimators (``beta``, ``T2``, ``clip``, ``Tadj``, ...);
``model.T1`` or ``aep.beta`` name the owner explicitly. A bare key owned by the model and by an estimator is
ambiguous and an error, as is a key nobody owns. Every value is validated before the first point runs.

The output file holds the sweep's specification and one record per finished point. It is rewritten atomically
after every point (on CUDA, after every group of points measured together, :func:`run_sweep`), so a sweep killed
at any moment leaves a valid file; rerunning the same command with the same ``--out`` skips the points already
there. A point whose relaxation diverges is recorded as failed, with its message, and the sweep goes on. Under
torchrun the points are shared out among the processes (``run_sweep``'s ``world``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ep_core.batching import stacks_step_size
from ep_core.config import ConfigError, suggest
from ep_core.distributed import ONE_PROCESS, World
from ep_core.errors import DistributedError, EpxError, ResumeError, UsageError
from ep_core.files import read_json, require, write_atomic
from ep_core.harness import MeasurementCache, Progress
from ep_core.plugins import Registry
from ep_core.protocols import StacksKnobs, StacksNudge, StacksStepSize
from ep_core.seeding import check_seed
from ep_core.session import model_data, run_problem_comparisons
from ep_core.summary import mean_std

FORMAT = "epx.sweep/1"


@dataclass(frozen=True)
class Axis:
    """One varied knob: the key as given, who owns it (``model`` or estimator labels) and its values."""

    key: str
    field: str
    owners: tuple[str, ...]
    values: tuple[str, ...]


def parse_vary(spec: str) -> tuple[str, tuple[str, ...]]:
    """'beta=0.01,0.02' -> ('beta', ('0.01', '0.02'))."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    items = tuple(v.strip() for v in values.split(","))
    if not sep or not key or not all(items):
        raise ConfigError("--vary", f"expected KEY=v1,v2,..., got {spec!r}")
    if len(set(items)) != len(items):
        raise ConfigError(key, f"repeated values in --vary {spec!r}")
    return key, items


def _fields(config_class: type) -> set[str]:
    return {row["name"] for row in config_class.describe()}


def resolve_axes(varies: Sequence[str], model_class: type, estimator_classes: Mapping[str, type]) -> list[Axis]:
    """Find each varied key's owner and validate every value against the owner's config."""
    model_fields = _fields(model_class.Config)
    estimator_fields = {label: _fields(cls.Config) for label, cls in estimator_classes.items()}
    axes: list[Axis] = []
    for spec in varies:
        key, values = parse_vary(spec)
        target, dot, name = key.partition(".")
        if dot:
            if target == "model":
                owners = ("model",) if name in model_fields else ()
                known = model_fields
            elif target in estimator_fields:
                owners = (target,) if name in estimator_fields[target] else ()
                known = estimator_fields[target]
            else:
                raise ConfigError(key, f"{target!r} is neither 'model' nor an estimator being run"
                                       f"{suggest(target, ['model', *estimator_fields])}")
            if not owners:
                raise ConfigError(key, f"{target} has no option {name!r}{suggest(name, known)}; "
                                       f"valid: {', '.join(sorted(known))}")
        else:
            name = key
            owners = tuple(["model"] if name in model_fields else []) + tuple(
                label for label, names in estimator_fields.items() if name in names)
            if "model" in owners and len(owners) > 1:
                raise ConfigError(key, f"ambiguous: both the model and {', '.join(owners[1:])} have {name!r}; "
                                       f"write model.{name} or {owners[1]}.{name}")
            if not owners:
                every = model_fields.union(*estimator_fields.values())
                raise ConfigError(key, f"neither the model nor any selected estimator has this option"
                                       f"{suggest(name, every)}")
        if any(axis.field == name and set(axis.owners) & set(owners) for axis in axes):
            raise ConfigError(key, "varied twice")
        for owner in owners:
            config = model_class.Config if owner == "model" else estimator_classes[owner].Config
            for value in values:
                config.from_mapping({name: value})
        axes.append(Axis(key=key, field=name, owners=owners, values=values))
    return axes


@dataclass(frozen=True)
class Point:
    values: dict[str, str]
    seed: int

    @property
    def id(self) -> str:
        return json.dumps({"values": self.values, "seed": self.seed}, sort_keys=True)


def grid(axes: Sequence[Axis], seeds: Sequence[int]) -> list[Point]:
    """Every combination of axis values (first axis slowest), each for every seed."""
    combos = itertools.product(*(axis.values for axis in axes)) if axes else [()]
    return [Point(dict(zip((a.key for a in axes), combo)), seed) for combo in combos for seed in seeds]


@dataclass(frozen=True)
class SweepSpec:
    """Everything that determines a sweep's results; a resumed sweep must match it exactly."""

    estimators: tuple[str, ...]
    model: str
    reference: str = "bptt"
    settings: dict[str, str] = field(default_factory=dict)
    model_settings: dict[str, str] = field(default_factory=dict)
    vary: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    data: str = "auto"
    batch_size: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 1

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


class SweepMismatch(ResumeError):
    def __init__(self, path: Path, differences: list[str]):
        super().__init__(f"--out: {path} holds a different sweep ({'; '.join(differences)}); use another "
                         f"file, or delete it to start over")


_KEEP = "use another --out file, or delete this one to start over (it was left unchanged)"


def _load(path: Path, spec: SweepSpec) -> list[dict[str, Any]]:
    """The records of the sweep file ``path``, checked: the format, the same specification as ``spec``, and every
    record well formed. A bad file is an error naming it, and is never overwritten."""
    if not path.exists():
        return []
    saved = read_json(path, what="an epx sweep file", remedy=_KEEP)
    require(path, isinstance(saved, dict), f"not an epx sweep file: it holds a {type(saved).__name__}", _KEEP)
    require(path, saved.get("format") == FORMAT, f"not an epx sweep file (format {saved.get('format')!r}, "
                                                 f"expected {FORMAT!r})", _KEEP)
    require(path, isinstance(saved.get("spec"), dict) and isinstance(saved.get("records"), list),
            "an epx sweep file needs a 'spec' object and a 'records' list", _KEEP)
    mine, theirs = spec.to_json(), saved["spec"]
    differences = [f"{k}: {theirs.get(k)!r} there, {mine[k]!r} now" for k in mine if theirs.get(k) != mine[k]]
    if differences:
        raise SweepMismatch(path, differences)
    for number, record in enumerate(saved["records"], start=1):
        where = f"record {number}"
        require(path, isinstance(record, dict), f"{where} is not an object", _KEEP)
        require(path, isinstance(record.get("values"), dict) and isinstance(record.get("seed"), int)
                and isinstance(record.get("id"), str), f"{where} needs 'id', 'values' and 'seed'", _KEEP)
        require(path, record["id"] == Point(record["values"], record["seed"]).id,
                f"{where}: its id does not match its values and seed", _KEEP)
        status = record.get("status")
        require(path, status in ("ok", "failed"), f"{where} has status {status!r}, not 'ok' or 'failed'", _KEEP)
        if status == "ok":
            comparison = record.get("comparison")
            require(path, isinstance(comparison, dict) and isinstance(comparison.get("results"), list)
                    and bool(comparison["results"]), f"{where} is 'ok' but holds no comparison results", _KEEP)
        else:
            require(path, isinstance(record.get("error"), str), f"{where} is 'failed' but has no error message",
                    _KEEP)
    return saved["records"]


@dataclass
class Sweep:
    spec: SweepSpec
    axes: list[Axis]
    records: list[dict[str, Any]]
    resumed: int

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "spec": self.spec.to_json(),
                "axes": [{"key": a.key, "owners": list(a.owners), "values": list(a.values)} for a in self.axes],
                "records": self.records}


def _point_settings(spec: SweepSpec, axes: Sequence[Axis], point: Point) -> tuple[dict[str, str], dict[str, str]]:
    model_settings = dict(spec.model_settings)
    settings = dict(spec.settings)
    for axis in axes:
        value = point.values[axis.key]
        for owner in axis.owners:
            if owner == "model":
                model_settings[axis.field] = value
            else:
                settings[f"{owner}.{axis.field}"] = value
    return settings, model_settings


def _units(points: Sequence[Point], together: set[str]) -> list[list[int]]:
    """The indices of the points that run together: each grid point's seeds, with those of the grid points that
    differ from it only in the keys ``together``."""
    units: dict[tuple, list[int]] = {}
    for index, point in enumerate(points):
        units.setdefault(tuple((k, v) for k, v in point.values.items() if k not in together), []).append(index)
    return list(units.values())


def _stacked_axes(axes: Sequence[Axis], model_class: type, estimator_classes: Mapping[str, type], device: str,
                  eager: bool) -> set[str]:
    """The keys of the axes whose grid points run together: the model's own knobs that it reads from buffers
    (:class:`~ep_core.protocols.StacksKnobs`), its step size where it declares it and every estimator scales with
    the force (:class:`~ep_core.protocols.StacksStepSize`, :class:`~ep_core.protocols.ForceHomogeneous`), and a
    nudge that every estimator owning it stacks (:class:`~ep_core.protocols.StacksNudge`), and only on CUDA without
    ``eager``, where problems measured together are one graph (stacked where the estimator allows it); elsewhere
    they would run one after the other anyway, and a point at a time keeps the output file current."""
    try:
        on_cuda = torch.device(device).type == "cuda"
    except (RuntimeError, ValueError):
        return set()  # not a device: the first point's run says so, as without knobs
    if eager or not on_cuda:
        return set()
    knobs = set(model_class.stacked_knobs) if isinstance(model_class, StacksKnobs) else set()
    if isinstance(model_class, StacksStepSize) and all(map(stacks_step_size, estimator_classes.values())):
        knobs.add(model_class.step_size_field)

    def stacks(owner: str, field: str) -> bool:
        if owner == "model":
            return field in knobs
        estimator = estimator_classes[owner]
        return isinstance(estimator, StacksNudge) and estimator.nudge_field == field
    return {axis.key for axis in axes if all(stacks(owner, axis.field) for owner in axis.owners)}


def run_sweep(registry: Registry, spec: SweepSpec, *, out: Path | None = None, data_dir: str | None = None,
              download: bool = True, warn: Callable[[str], None] | None = None,
              on_point: Callable[[int, int, Point], None] | None = None,
              on_record: Callable[[int, int, dict[str, Any], bool], None] | None = None,
              progress: Progress | None = None, eager: bool = False, world: World = ONE_PROCESS) -> Sweep:
    """Run every point of ``spec`` not already in ``out``; write ``out`` after each point's seeds.

    With several processes (``world``, :mod:`ep_core.distributed`) the grid points still to run are dealt out in
    rounds, one point (with its pending seeds) per rank and round, each rank on its own device
    (:meth:`World.place`). After every round the ranks exchange their records, and rank 0 rewrites ``out``. A
    killed job loses at most the round in flight, and a rerun resumes with any number of processes. Every rank
    returns the whole sweep; records equal a one-process run's, timings and environment aside.

    The seeds of one point are measured together (:func:`ep_core.session.run_problem_comparisons`: on CUDA, one
    graph per estimator that runs them side by side or stacked; ``eager``: no CUDA graphs), each with the numbers it
    has alone; on CUDA, so are the grid points that differ only in knobs the model or the estimators stack (lm's
    and cet's s and c, the models' ε where every estimator scales with the force, ep's and aep's β:
    :func:`_stacked_axes`), and ``out`` is written after each such group. Each estimator is measured once per
    distinct problem (:class:`~ep_core.harness.MeasurementCache`): grid points that differ only in the compared
    estimators' settings share the reference, and those that differ only in another estimator's settings share
    an estimator; the records say so (``shared_measurement``).
    ``on_point(index, total, point)`` is called before a point's pending seeds run on this rank (with the first of
    them), ``on_record(index, total, record, resumed)`` for each seed after its round, in grid order, with its record
    (``resumed``: it was already in ``out``)."""
    for seed in spec.seeds:
        check_seed(seed, option="--seed/--seeds")
    model_class = registry.get("model", spec.model).factory
    labels = [e for e in dict.fromkeys(spec.estimators) if e != spec.reference]
    if not labels:
        raise ConfigError("estimators", f"name at least one estimator besides the reference {spec.reference!r}")
    classes = {label: registry.get("estimator", label).factory for label in [spec.reference, *labels]}
    axes = resolve_axes(spec.vary, model_class, classes)
    for axis in axes:
        fixed = [f"--model-set {axis.field}" for owner in axis.owners
                 if owner == "model" and axis.field in spec.model_settings]
        fixed += [f"--set {key}" for owner in axis.owners if owner != "model"
                  for key in (axis.field, f"{owner}.{axis.field}") if key in spec.settings]
        if fixed:
            raise ConfigError(axis.key, f"varied with --vary and also fixed with {' and '.join(dict.fromkeys(fixed))}; "
                                        "give it in one place")
    points = grid(axes, spec.seeds)
    done = {record["id"]: record for record in (_load(out, spec) if out else [])}
    sweep = Sweep(spec, axes, [], resumed=sum(p.id in done for p in points))
    device = world.place(spec.device)
    dataset = None
    if len(done) < len(points):
        with world.main_first(what="loading the data"):
            dataset = model_data(registry, model_class, spec.data, spec.model_settings, data_dir=data_dir,
                                 download=download, warn=warn)

    cache = MeasurementCache()

    def measured(pending: list[Point]) -> list[dict[str, Any]]:
        """The records of one grid point's pending seeds, measured together; when the group fails, each seed
        alone, so that a seed's failure is its own record and the other seeds' results are kept."""
        try:
            comparisons = run_problem_comparisons(
                registry, [spec.reference, *labels], spec.model, reference=spec.reference,
                problems=[(*_point_settings(spec, axes, p), p.seed) for p in pending], data=spec.data,
                batch_size=spec.batch_size, dtype=spec.dtype, device=device, repeats=spec.repeats,
                dataset=dataset, progress=progress, eager=eager, cache=cache)
        except (UsageError, DistributedError):
            raise  # not this point's failure: the options are wrong, or the job is ending
        except EpxError as exc:
            if len(pending) > 1:
                return [record for point in pending for record in measured([point])]
            return [{"id": pending[0].id, "values": pending[0].values, "seed": pending[0].seed, "status": "failed",
                     "error": str(exc)}]
        return [{"id": p.id, "values": p.values, "seed": p.seed, "status": "ok", "comparison": c.to_json()}
                for p, c in zip(pending, comparisons)]

    units = _units(points, _stacked_axes(axes, model_class, classes, device, eager))
    pending_units = [k for k, unit in enumerate(units) if any(points[i].id not in done for i in unit)]
    fresh_ids: set[str] = set()
    reported = 0

    def report() -> None:
        """Hand the records of the points done so far, up to the first one not done, to on_record and to the
        sweep, in grid order."""
        nonlocal reported
        while reported < len(points) and points[reported].id in done:
            record = done[points[reported].id]
            sweep.records.append(record)
            if on_record:
                on_record(reported, len(points), record, points[reported].id not in fresh_ids)
            reported += 1

    for start in range(0, len(pending_units), world.size):
        round_units = pending_units[start:start + world.size]
        mine = units[round_units[world.rank]] if world.rank < len(round_units) else range(0)
        pending = [i for i in mine if points[i].id not in done]
        if on_point and pending:
            on_point(pending[0], len(points), points[pending[0]])
        records = measured([points[i] for i in pending]) if pending else []
        for record in (r for rank_records in world.gather_json(records, what="gathering finished points")
                       for r in rank_records):
            done[record["id"]] = record
            fresh_ids.add(record["id"])
        if out and world.main:
            write_atomic(out, json.dumps({**sweep.to_json(), "records": [done[p.id] for p in points if p.id in done]},
                                         indent=1, allow_nan=False) + "\n")
        report()
    report()
    return sweep


def summarize(sweep: Mapping[str, Any], *, group: str | None = None) -> list[dict[str, Any]]:
    """One row per grid point (seeds pooled): mean and std of each estimator's cosine (overall and, with
    ``group``, of that parameter group) and ms per gradient, the reference's free-phase residual, and the
    largest distance between any two estimators' free equilibria. Works on the JSON form of a sweep.

    Means are over the seeds that succeeded: ``seeds`` of the ``seeds_run`` seeds run at the point. The others
    are ``failed_seeds``, with their messages in ``errors`` (in the same order). ``converged`` is whether the
    reference's free phase converged for every seed that succeeded (None when none did)."""
    rows: dict[str, dict[str, Any]] = {}
    for record in sweep["records"]:
        key = json.dumps(record["values"], sort_keys=True)
        row = rows.setdefault(key, {"values": record["values"], "runs": [], "errors": [], "failed_seeds": []})
        if record["status"] == "ok":
            row["runs"].append(record["comparison"])
        else:
            row["errors"].append(record["error"])
            row["failed_seeds"].append(record["seed"])
    summary = []
    for row in rows.values():
        runs = row.pop("runs")
        labels = [r["label"] for r in runs[0]["results"]] if runs else []
        estimators = {}
        for label in labels:
            results = [next(r for r in run["results"] if r["label"] == label) for run in runs]
            estimators[label] = {
                "cosine": mean_std([r["metrics"]["cosine"] for r in results]),
                "group_cosine": mean_std([r["metrics"]["groups"].get(group) for r in results]) if group else None,
                "ms": mean_std([r["ms_median"] for r in results]),
            }
        distances = [d for run in runs for r in run["results"] for d in r["fixed_point_distance"].values()]
        summary.append({
            **row,
            "seeds": len(runs),
            "seeds_run": len(runs) + len(row["errors"]),
            "reference": runs[0]["reference"] if runs else None,
            "estimators": estimators,
            "residual": mean_std([run["results"][0]["residual"] for run in runs]),
            "converged": all(run["results"][0]["converged"] for run in runs) if runs else None,
            "fixed_point_distance": max(distances) if distances else None,
        })
    return summary
