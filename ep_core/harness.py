"""The comparison harness: run estimators and the reference on one model and batch, and measure each estimate.

Per estimator: cosine to the reference (all parameters, each parameter group, each parameter), relative L2 error
||ĝ − g|| / ||g||, norm ratio ||ĝ|| / ||g||, median milliseconds per gradient after a warm-up (CUDA synchronised),
peak memory (CUDA only: the CPU allocator keeps no high-water mark), the free-phase residual, and force
evaluations. Whether repeated runs gave bit-identical gradients is recorded too, and so is the relative distance
||x*_a − x*_b|| / ||x*_b|| between the free equilibria that estimators a and b reached (0 when they share the
same free phase, as ep and aep must). A parameter or group whose
reference gradient is zero has no defined cosine and is reported as None ("n/a"), never NaN.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ep_core.protocols import (Batch, EpxError, EquilibriumModel, GradientEstimate, ResidualModel, State,
                               StatefulEstimator)
from ep_core.analysis import fixed_point_stability
from ep_core.capture import Runner, eager_estimate
from ep_core.relax import CONVERGED_TOL, PhaseRecord, norm, recording, sub
from ep_core.residual_stream import meaningless, residual_stream
from ep_core.seeding import ESTIMATOR_STREAM, PROBE_STREAM, STATE_STREAM, generator

FORMAT = "epx.comparison/1"

Progress = Callable[[str, int, int], None]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if nb == 0 or not torch.isfinite(na * nb):
        return None
    if na == 0:
        return 0.0
    return float(torch.dot(a, b) / (na * nb))


def _concat(grads: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([grads[n].detach().double().reshape(-1) for n in names])


def gradient_metrics(estimate: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                     groups: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Cosines (overall, per group, per parameter), relative error and norm ratio of ``estimate`` to ``reference``."""
    missing = set(reference) - set(estimate)
    if missing:
        raise ValueError(f"the estimate has no gradient for {sorted(missing)}")
    names = list(reference)
    est, ref = _concat(estimate, names), _concat(reference, names)
    ref_norm = float(torch.linalg.vector_norm(ref))
    est_norm = float(torch.linalg.vector_norm(est))
    return {
        "cosine": _cosine(est, ref),
        "groups": {g: _cosine(_concat(estimate, members), _concat(reference, members))
                   for g, members in groups.items()},
        "parameters": {n: _cosine(estimate[n], reference[n]) for n in names},
        "rel_error": float(torch.linalg.vector_norm(est - ref)) / ref_norm if ref_norm > 0 else None,
        "norm_ratio": est_norm / ref_norm if ref_norm > 0 else None,
    }


@dataclass
class Measurement:
    estimate: GradientEstimate
    ms: list[float]
    peak_memory_bytes: int | None
    deterministic: bool
    calls: dict[str, int] = field(default_factory=dict)
    """Force (and non-conservative part) evaluations of one estimate; empty for a model without a force."""
    mode: str = "eager"
    """How the timed estimates ran: "captured" (replays of a CUDA graph), "stacked" (replays of one graph of the
    group's stack, :mod:`ep_core.batching`) or "eager"."""
    group_size: int = 1
    """Problems timed together (:func:`measure_group`): ``ms`` are the times of all of them."""
    phases: list[PhaseRecord] = field(default_factory=list)
    """The relaxations of the counted estimate (:func:`ep_core.relax.recording`), in order."""


def _same(a: GradientEstimate, b: GradientEstimate) -> bool:
    return all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)


COUNTED = {"force": "force", "split_force": "force", "nonconservative": "nonconservative",
           "conservative": "conservative"}
"""The model methods counted, and the counter each adds to: ``split_force`` is one evaluation of F, N coming with
it (:class:`~ep_core.protocols.SplitsForce`); ``conservative`` evaluates F − N alone
(:class:`~ep_core.protocols.DeclaresConservative`)."""


@contextmanager
def counting(model: Any) -> Iterator[dict[str, int]]:
    """Count ``model``'s evaluations of F and N while the block runs (:data:`COUNTED`): how the harness knows what an
    estimate cost in force evaluations, without each estimator counting by hand. The counters are put on the model
    itself, shadowing its methods until the block ends, rather than on a proxy: Python 3.12's protocol checks look
    attributes up statically, and would not see a proxy's forwarded ones."""
    calls = {counter: 0 for counter in COUNTED.values()}
    wrapped = []
    for name, counter in COUNTED.items():
        method = getattr(model, name, None)
        if method is None:
            continue

        def counted(*args: Any, _counter: str = counter, _method: Any = method, **kwargs: Any) -> Any:
            calls[_counter] += 1
            return _method(*args, **kwargs)
        object.__setattr__(model, name, counted)
        wrapped.append(name)
    try:
        yield calls
    finally:
        for name in wrapped:
            object.__delattr__(model, name)


def measure(estimator, model, batch: Batch, *, seed: int, repeats: int, warmup: int = 1,
            eager: bool = False) -> Measurement:
    """Run one untimed estimate (whose result is returned, and whose force evaluations are counted), ``warmup − 1``
    more untimed ones, then ``repeats`` timed ones; each gets the estimator generator derived from ``seed``. On
    CUDA a capturable estimator's estimates are replays of one CUDA graph (:mod:`ep_core.capture`) unless
    ``eager``: the force evaluations are counted on an eager run first, and peak memory is the graph's."""
    return measure_group([(estimator, model)], [batch], seeds=[seed], repeats=repeats, warmup=warmup,
                         eager=eager)[0]


def measure_group(members: Sequence[tuple[Any, Any]], batches: Sequence[Batch], *, seeds: Sequence[int],
                  repeats: int, warmup: int = 1, eager: bool = False,
                  stacking: bool | None = None) -> list[Measurement]:
    """:func:`measure` for several (estimator, model) problems run together (:class:`ep_core.capture.Runner`):
    on CUDA, captured, their estimates are one graph whose problems run side by side, and every timed run times
    them all; eagerly they run one after the other. Each problem's estimate is what it would be alone.

    An estimator whose work is fixed makes the same evaluations on every problem of one configuration, so where
    the group is captured they are counted on one eager run per configuration; eagerly, on each problem's own
    first run. ``stacking`` is the :class:`~ep_core.capture.Runner`'s."""
    device = next(members[0][1].parameters()).device
    cuda = device.type == "cuda"
    runner = Runner(list(members), eager=eager, stacking=stacking)

    def generators() -> list[torch.Generator]:
        return [generator(seed, ESTIMATOR_STREAM, device) for seed in seeds]

    calls: list[dict[str, int]] = []
    phases: list[list[PhaseRecord]] = []
    if runner.capture_wanted():
        counted_by_kind: dict[tuple, tuple[dict[str, int], list[PhaseRecord]]] = {}
        for (estimator, model), batch, seed in zip(members, batches, seeds):
            kind = (type(estimator), estimator.config, model.config)
            if kind not in counted_by_kind:
                with counting(model) as counted, recording() as relaxations:
                    eager_estimate(estimator, model, batch, generator=generator(seed, ESTIMATOR_STREAM, device))
                counted_by_kind[kind] = counted, relaxations
            calls.append(counted_by_kind[kind][0])
            phases.append(counted_by_kind[kind][1])
        firsts = runner.run(list(batches), generators())
    else:
        firsts = []
        for (estimator, model), batch, gen in zip(members, batches, generators()):
            with counting(model) as counted, recording() as relaxations:
                firsts.append(eager_estimate(estimator, model, batch, generator=gen))
            calls.append(counted)
            phases.append(relaxations)
    for (estimator, _), first in zip(members, firsts):
        broken = [name for name, g in first.grads.items() if not bool(torch.isfinite(g).all())]
        if broken:
            raise EpxError(f"{type(estimator).name} returned non-finite gradients for {', '.join(broken)}")
    for _ in range(warmup - 1):
        runner.run(list(batches), generators())
    times: list[float] = []
    peak: int | None = None
    deterministic = [True] * len(members)
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        again = runner.run(list(batches), generators())
        if cuda:
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
        if cuda:
            peak = max(peak or 0, torch.cuda.max_memory_allocated(device) - baseline)
        deterministic = [d and _same(a, b) for d, a, b in zip(deterministic, firsts, again)]
    if runner.mode in ("captured", "stacked"):
        peak = max(peak or 0, runner.peak_bytes or 0)
    return [Measurement(first, times, peak, same, counts if isinstance(model, EquilibriumModel) else {},
                        mode=runner.mode, group_size=len(members), phases=relaxations)
            for first, same, counts, relaxations, (_, model) in zip(firsts, deterministic, calls, phases, members)]


@dataclass
class Result:
    """One estimator's row of a comparison."""

    label: str
    estimator: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    ms_median: float | None
    ms: list[float]
    peak_memory_bytes: int | None
    residual: float | None
    converged: bool | None
    force_evals: int | None
    deterministic: bool
    fixed_point_distance: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    execution: str = "eager"
    """"captured" when the timed estimates were replays of a CUDA graph, "stacked" when the graph held the
    stack of a group of problems (:mod:`ep_core.batching`), else "eager"."""
    shared_measurement: bool = False
    """True when this row was measured once for an earlier problem that is the same computation
    (:class:`MeasurementCache`): its gradients are this problem's exactly, its times are that measurement's."""

    def to_json(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@dataclass
class Comparison:
    meta: dict[str, Any]
    reference: str
    results: list[Result]

    def result(self, label: str) -> Result:
        for r in self.results:
            if r.label == label:
                return r
        raise KeyError(f"no result {label!r}; have {[r.label for r in self.results]}")

    @property
    def converged(self) -> bool:
        return all(r.converged is not False for r in self.results)

    @property
    def meaningful(self) -> bool:
        """False when the reference itself makes cosines meaningless (a collapsed gradient, an exploded stream)."""
        stream = self.meta.get("residual_stream")
        return not (stream and stream["not_meaningful"])

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **jsonable(self.meta), "reference": self.reference,
                "converged": self.converged, "meaningful": self.meaningful,
                "results": [r.to_json() for r in self.results]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False)


def jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _relative_distance(a: State, b: State) -> float:
    with torch.no_grad():
        scale = norm(b)
        return float(norm(sub(a, b)) / scale) if scale > 0 else float(norm(a))


def _result(label: str, estimator, measurement: Measurement, metrics: dict[str, Any], tol: float, *,
            shared: bool = False) -> Result:
    equilibrium = measurement.estimate.equilibrium
    residual = equilibrium.residual if equilibrium is not None else None
    stats = ({"T1": equilibrium.steps} if equilibrium is not None else {}) | measurement.estimate.stats.to_dict()
    force_evals = measurement.calls.get("force")
    for part in ("nonconservative", "conservative"):
        if measurement.calls.get(part):
            stats[f"{part}_evals"] = measurement.calls[part]
    if any(record.converged is not None for record in measurement.phases):
        # A solver with a tolerance ran: each phase's evaluations, and whether it reached the tolerance or stopped
        # on its bound (T1, T2), which its state alone does not tell.
        stats["phases"] = [dataclasses.asdict(record) for record in measurement.phases]
    return Result(
        label=label,
        estimator=type(estimator).name,
        config=estimator.config.to_dict(),
        metrics=metrics,
        ms_median=statistics.median(measurement.ms) if measurement.ms else None,
        ms=measurement.ms,
        peak_memory_bytes=measurement.peak_memory_bytes,
        residual=residual,
        converged=None if residual is None else bool(residual <= tol),
        force_evals=force_evals,
        deterministic=measurement.deterministic,
        stats=stats,
        execution=measurement.mode,
        shared_measurement=shared,
    )


def environment() -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"epx": version("epx"), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def init_state(estimator: Any, model: Any, *, seed: int) -> None:
    """Build a stateful estimator's state (DFA's feedback matrices) from the model and the seed's own stream, on
    the CPU so that the state is the same on every device; nothing for an estimator without state."""
    if isinstance(estimator, StatefulEstimator):
        estimator.init(model, generator=generator(seed, STATE_STREAM))


def _end_state(estimate: GradientEstimate) -> State | None:
    return estimate.equilibrium.state if estimate.equilibrium is not None else None


@dataclass
class _Problem:
    """What an estimate depends on, kept to recognise the same computation: the estimator's type and
    configuration, the model's type, configuration, parameters and buffers (``tensors``, with the batch), and the
    seed."""

    estimator: tuple[type, Any]
    model: tuple[type, Any]
    tensors: dict[str, torch.Tensor]
    seed: int

    @classmethod
    def of(cls, estimator: Any, model: Any, batch: Batch, seed: int,
           tensors: dict[str, torch.Tensor] | None = None) -> _Problem:
        """``tensors``: a snapshot of the model and batch already taken (:func:`_snapshot`), shared by the
        estimators of one case."""
        return cls((type(estimator), estimator.config), (type(model), model.config),
                   _snapshot(model, batch) if tensors is None else tensors, seed)

    def same(self, other: _Problem) -> bool:
        return (self.estimator == other.estimator and self.model == other.model and self.seed == other.seed
                and self.tensors.keys() == other.tensors.keys()
                and all(_identical(t, other.tensors[name]) for name, t in self.tensors.items()))


def _snapshot(model: Any, batch: Batch) -> dict[str, torch.Tensor]:
    tensors = {f"model.{name}": t.detach().clone() for name, t in model.state_dict().items()}
    return tensors | {f"batch.{key}": value.detach().clone() for key, value in batch.items()}


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and torch.equal(a, b)


class MeasurementCache:
    """Measurements kept across comparisons, so that an estimate that is the same computation is measured once: a
    sweep's grid points rebuild the same model from the same seed and draw the same batch, so the reference is the
    same work at points that differ only in the compared estimators' settings (β, T2, clip), and so is ep where
    only ``aep.T2`` varies. Sameness is checked on the configurations and tensors themselves (:class:`_Problem`),
    not inferred from the settings; estimators with state (:class:`~ep_core.protocols.StatefulEstimator`) are
    never shared. Holds the last ``size`` problems."""

    def __init__(self, size: int = 64):
        self.size = size
        self._entries: list[tuple[_Problem, Measurement]] = []

    def find(self, problem: _Problem) -> Measurement | None:
        return next((measurement for known, measurement in self._entries if known.same(problem)), None)

    def add(self, problem: _Problem, measurement: Measurement) -> None:
        self._entries = [*self._entries, (problem, measurement)][-self.size:]


def _cached_measurements(cases: Sequence[Case], label: str, cache: MeasurementCache,
                         snapshots: Sequence[dict[str, torch.Tensor]], *, repeats: int, warmup: int, eager: bool,
                         stacking: bool | None) -> tuple[list[Measurement], list[bool]]:
    """The measurement of estimator ``label`` on each case, and whether it was shared: the cases whose problem is
    in ``cache``, or repeats one of these cases, take that measurement; the others are measured together."""
    problems = [None if isinstance(case.estimators[label], StatefulEstimator)
                else _Problem.of(case.estimators[label], case.model, case.batch, case.seed, snapshot)
                for case, snapshot in zip(cases, snapshots)]
    found: dict[int, Measurement] = {}
    twin_of: dict[int, int] = {}
    fresh: list[int] = []
    for index, problem in enumerate(problems):
        if problem is not None and (known := cache.find(problem)) is not None:
            found[index] = known
            continue
        twin = next((j for j in fresh if problem is not None and problems[j] is not None and problems[j].same(problem)),
                    None)
        if twin is None:
            fresh.append(index)
        else:
            twin_of[index] = twin
    if fresh:
        new = measure_group([(cases[i].estimators[label], cases[i].model) for i in fresh],
                            [cases[i].batch for i in fresh], seeds=[cases[i].seed for i in fresh], repeats=repeats,
                            warmup=warmup, eager=eager, stacking=stacking)
        for index, measurement in zip(fresh, new):
            found[index] = measurement
            if problems[index] is not None:
                cache.add(problems[index], measurement)
    for index, twin in twin_of.items():
        found[index] = found[twin]
    return [found[index] for index in range(len(cases))], [index not in fresh for index in range(len(cases))]


def compare(estimators: Sequence[tuple[str, Any]], model, batch: Batch, *, reference: tuple[str, Any],
            seed: int = 0, repeats: int = 3, warmup: int = 1, converged_tol: float = CONVERGED_TOL,
            stability_iterations: int = 30, meta: Mapping[str, Any] | None = None,
            progress: Progress | None = None, eager: bool = False) -> Comparison:
    """Measure each (label, estimator) against the reference (label, estimator) on ``model`` and ``batch``.

    The reference is listed first in the results, with cosine 1 by construction. Where the reference reports
    the state it ended in, ρ(J_G) there is estimated with ``stability_iterations`` Arnoldi steps (0: skip) and
    recorded as ``fixed_point``: whether the fixed point the estimators assume is an attracting one. ``eager``:
    never replay CUDA graphs (:func:`measure`).
    """
    case = Case(model=model, batch=batch, seed=seed, estimators=dict([reference, *estimators]), meta=meta or {})
    return compare_cases([case], [label for label, _ in estimators], reference=reference[0], repeats=repeats,
                         warmup=warmup, converged_tol=converged_tol, stability_iterations=stability_iterations,
                         progress=progress, eager=eager)[0]


@dataclass
class Case:
    """One problem of a comparison: a model, its batch and seed, its own estimators by label (the reference among
    them) and what its comparison records about it (``meta``)."""

    model: Any
    batch: Batch
    seed: int
    estimators: dict[str, Any]
    meta: Mapping[str, Any] = field(default_factory=dict)


def compare_cases(cases: Sequence[Case], labels: Sequence[str], *, reference: str, repeats: int = 3,
                  warmup: int = 1, converged_tol: float = CONVERGED_TOL, stability_iterations: int = 30,
                  progress: Progress | None = None, eager: bool = False,
                  stacking: bool | None = None, cache: MeasurementCache | None = None) -> list[Comparison]:
    """:func:`compare` on each of ``cases`` (seeds, grid points), each estimator measured on all of them together
    (:func:`measure_group`: on CUDA one graph whose problems run side by side). One :class:`Comparison` per case,
    whose numbers are those it would have alone; with several cases its ``group`` says how many were timed
    together, since each row's times are then the whole group's. With ``cache``, each estimator is measured once
    per distinct problem, across these cases and earlier calls (:class:`MeasurementCache`), and a row that reuses
    a measurement says so (``Result.shared_measurement``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not cases:
        raise ValueError("compare_cases needs at least one case")
    total = len(labels) + 1
    for case in cases:
        for estimator in case.estimators.values():
            init_state(estimator, case.model, seed=case.seed)
    order = [reference, *labels]
    measured: dict[str, list[Measurement]] = {}
    shared: dict[str, list[bool]] = {label: [False] * len(cases) for label in order}
    snapshots = [_snapshot(case.model, case.batch) for case in cases] if cache is not None else []
    for done, label in enumerate(order):
        if progress:
            progress(label, done, total)
        if cache is not None:
            measured[label], shared[label] = _cached_measurements(cases, label, cache, snapshots, repeats=repeats,
                                                                  warmup=warmup, eager=eager, stacking=stacking)
            continue
        measured[label] = measure_group([(case.estimators[label], case.model) for case in cases],
                                        [case.batch for case in cases], seeds=[case.seed for case in cases],
                                        repeats=repeats, warmup=warmup, eager=eager, stacking=stacking)
    comparisons = [_comparison(case, index, order, measured, reference=reference, repeats=repeats, warmup=warmup,
                               converged_tol=converged_tol, stability_iterations=stability_iterations,
                               group=len(cases), shared={label: flags[index] for label, flags in shared.items()})
                   for index, case in enumerate(cases)]
    if progress:
        progress("done", total, total)
    return comparisons


def _comparison(case: Case, index: int, order: Sequence[str], measured: Mapping[str, list[Measurement]], *,
                reference: str, repeats: int, warmup: int, converged_tol: float, stability_iterations: int,
                group: int, shared: Mapping[str, bool] | None = None) -> Comparison:
    model, batch, seed = case.model, case.batch, case.seed
    groups = model.parameter_groups()
    ref_grads = measured[reference][index].estimate.grads
    results, fixed_points = [], {}
    for label in order:
        m = measured[label][index]
        results.append(_result(label, case.estimators[label], m, gradient_metrics(m.estimate.grads, ref_grads,
                                                                                    groups), converged_tol,
                               shared=bool(shared and shared[label])))
        fixed_points[label] = _end_state(m.estimate)
    for result in results:
        mine = fixed_points[result.label]
        result.fixed_point_distance = {other: _relative_distance(mine, theirs)
                                       for other, theirs in fixed_points.items()
                                       if other != result.label and mine is not None and theirs is not None}
    stream = residual_stream(model, batch) if isinstance(model, ResidualModel) else None
    if stream is not None:
        reference_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double())
                                                                     for g in ref_grads.values()])))
        stream["reference_grad_norm"] = reference_norm
        stream["not_meaningful"] = meaningless(stream, reference_norm)
    end_state = fixed_points[reference]
    stability = None
    if stability_iterations and end_state is not None:
        stability = fixed_point_stability(model, batch, end_state, iterations=stability_iterations,
                                          generator=generator(seed, PROBE_STREAM))
    device = next(model.parameters())
    info = {"seed": seed, "repeats": repeats, "warmup": warmup, "converged_tol": converged_tol,
            "dtype": str(device.dtype).removeprefix("torch."), "device": str(device.device),
            "parameter_groups": {g: list(m) for g, m in groups.items()}, "fixed_point": stability,
            "residual_stream": stream,
            "environment": environment()}
    if group > 1:
        info["group"] = {"size": group, "note": "each row's ms are the time of all the group's problems together"}
        fewer = {label: m[index].group_size for label, m in measured.items() if m[index].group_size != group}
        if fewer:
            info["group"]["sizes"] = fewer
            info["group"]["note"] += "; those in 'sizes', of the distinct problems among them"
    return Comparison(meta={**case.meta, **info}, reference=reference, results=results)
