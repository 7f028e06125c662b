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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ep_core.protocols import (Batch, EpxError, EquilibriumModel, GradientEstimate, ResidualModel, State,
                               StatefulEstimator)
from ep_core.analysis import fixed_point_stability
from ep_core.relax import CONVERGED_TOL, norm, sub
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


def _same(a: GradientEstimate, b: GradientEstimate) -> bool:
    return all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)


class Counted:
    """``model`` with its calls of ``force`` and ``nonconservative`` counted: how the harness knows what an estimate
    cost in force evaluations, without each estimator counting by hand. Everything else is the model's own, so the
    protocols the model satisfies are the ones this satisfies."""

    COUNTED = ("force", "nonconservative")

    def __init__(self, model: Any):
        self._model = model
        self.calls = {name: 0 for name in self.COUNTED}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._model, name)
        if name not in self.COUNTED:
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return value(*args, **kwargs)
        return counted


def measure(estimator, model, batch: Batch, *, seed: int, repeats: int, warmup: int = 1) -> Measurement:
    """Run one untimed estimate (whose result is returned, and whose force evaluations are counted), ``warmup − 1``
    more untimed ones, then ``repeats`` timed ones; each gets the estimator generator derived from ``seed``."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"

    def run(on: Any = model) -> GradientEstimate:
        return estimator.estimate(on, batch, generator=generator(seed, ESTIMATOR_STREAM, device))

    counted = Counted(model)
    first = run(counted)
    broken = [name for name, g in first.grads.items() if not bool(torch.isfinite(g).all())]
    if broken:
        raise EpxError(f"{type(estimator).name} returned non-finite gradients for {', '.join(broken)}")
    for _ in range(warmup - 1):
        run()
    times: list[float] = []
    peak: int | None = None
    deterministic = True
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        again = run()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
        if cuda:
            peak = max(peak or 0, torch.cuda.max_memory_allocated(device) - baseline)
        deterministic = deterministic and _same(first, again)
    return Measurement(first, times, peak, deterministic, counted.calls if isinstance(model, EquilibriumModel) else {})


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


def _result(label: str, estimator, measurement: Measurement, metrics: dict[str, Any], tol: float) -> Result:
    equilibrium = measurement.estimate.equilibrium
    residual = equilibrium.residual if equilibrium is not None else None
    stats = ({"T1": equilibrium.steps} if equilibrium is not None else {}) | measurement.estimate.stats.to_dict()
    force_evals = measurement.calls.get("force")
    if measurement.calls.get("nonconservative"):
        stats["nonconservative_evals"] = measurement.calls["nonconservative"]
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


def compare(estimators: Sequence[tuple[str, Any]], model, batch: Batch, *, reference: tuple[str, Any],
            seed: int = 0, repeats: int = 3, warmup: int = 1, converged_tol: float = CONVERGED_TOL,
            stability_iterations: int = 30, meta: Mapping[str, Any] | None = None,
            progress: Progress | None = None) -> Comparison:
    """Measure each (label, estimator) against the reference (label, estimator) on ``model`` and ``batch``.

    The reference is listed first in the results, with cosine 1 by construction. Where the reference reports
    the state it ended in, ρ(J_G) there is estimated with ``stability_iterations`` Arnoldi steps (0: skip) and
    recorded as ``fixed_point``: whether the fixed point the estimators assume is an attracting one.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    groups = model.parameter_groups()
    total = len(estimators) + 1
    ref_label, ref_estimator = reference
    for _, estimator in [reference, *estimators]:
        init_state(estimator, model, seed=seed)
    if progress:
        progress(ref_label, 0, total)
    ref_measurement = measure(ref_estimator, model, batch, seed=seed, repeats=repeats, warmup=warmup)
    ref_grads = ref_measurement.estimate.grads
    results = [_result(ref_label, ref_estimator, ref_measurement, gradient_metrics(ref_grads, ref_grads, groups),
                       converged_tol)]
    fixed_points = {ref_label: _end_state(ref_measurement.estimate)}
    for done, (label, estimator) in enumerate(estimators, start=1):
        if progress:
            progress(label, done, total)
        m = measure(estimator, model, batch, seed=seed, repeats=repeats, warmup=warmup)
        results.append(_result(label, estimator, m, gradient_metrics(m.estimate.grads, ref_grads, groups),
                               converged_tol))
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
    end_state = fixed_points[ref_label]
    stability = None
    if stability_iterations and end_state is not None:
        stability = fixed_point_stability(model, batch, end_state, iterations=stability_iterations,
                                          generator=generator(seed, PROBE_STREAM))
    if progress:
        progress("done", total, total)
    device = next(model.parameters())
    info = {"seed": seed, "repeats": repeats, "warmup": warmup, "converged_tol": converged_tol,
            "dtype": str(device.dtype).removeprefix("torch."), "device": str(device.device),
            "parameter_groups": {g: list(m) for g, m in groups.items()}, "fixed_point": stability,
            "residual_stream": stream,
            "environment": environment()}
    return Comparison(meta={**(meta or {}), **info}, reference=ref_label, results=results)
