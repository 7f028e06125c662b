"""Milliseconds per gradient of the EP family and bptt, eager and captured, against each one's floor, in one run.

    python benchmarks/speed.py [--device cuda] [--repeats 20] [--models lm,cet] [--out FILE]
    python benchmarks/speed.py --table FILE [FILE ...]     # the README table of earlier runs

Problems: lm at seed 002's settings (T1=120, β=0.02, T2=20, aep clip 1; the lm defaults otherwise) and cet's
defaults, seed 0, on their default data. For each estimator and mode (eager; captured on CUDA) the median of
``repeats`` timed estimates after a warm-up, and the estimate's cosine to the eager one. Eager estimates and
their floors are timed by turns, one of each at a time, so that a shared CPU's changing pace falls on both;
captured ones are the harness's replays (:func:`ep_core.harness.measure`), timed before their floor.

The floor of an estimate is the same work stripped to its arithmetic: as many bare steps x ← Π(x + εF(x)) and
evaluations of the non-conservative part N as the estimate made (counted by the harness) — those of the nudged
phases with the nudge −β∇ₓC(x) in their force, as the nudged force is F − β∇ₓC, and with −∇E = F − N in place
of F where the estimate's nudged steps evaluated that alone (uncapped aep on lm and cet) — then as many
applications of a cached vjp as the estimate applied (its ``vjp_evals``: of N for aep, of G for adjoint; bptt:
one of G per unrolled step, its backward pass), timed in the same run and the same mode (captured as one CUDA
graph on CUDA). "× floor" is the estimate's median over the
floor's: what the estimator's own bookkeeping costs.

Exit 3 when an EP-family estimator (ep, aep, adjoint) is above 1.5× its floor on a GPU (1.3× on the CPU) in the
mode it runs in by default, or when a captured estimate's cosine to the eager one is below 1 − 1e-5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ep_core.capture import eager_estimate, with_parameter_terms
from ep_core.files import write_atomic
from ep_core.harness import environment, gradient_metrics, measure
from ep_core.plugins import load
from ep_core.protocols import DeclaresNonconservative
from ep_core.relax import linearize, nudged_force, relaxation_map, step
from ep_core.seeding import ESTIMATOR_STREAM, generator
from ep_core.session import build_problem

PROBLEMS = {
    "lm": {"model_settings": {"T1": "120"}, "settings": {"beta": "0.02", "T2": "20", "aep.clip": "1"}},
    "cet": {"model_settings": {}, "settings": {}},
}
ESTIMATORS = ("ep", "aep", "adjoint", "bptt")
EP_FAMILY = ("ep", "aep", "adjoint")
BOUND = {"cuda": 1.5, "cpu": 1.3}
COSINE_TOL = 1e-5


def timed(functions: list[Callable[[], Any]], device: torch.device, repeats: int) -> list[float]:
    """Median ms of ``repeats`` calls of each of ``functions``, after two untimed ones, the calls taking turns so
    that a change in the machine's speed falls on all of them (device synchronised around each)."""
    for fn in functions:
        for _ in range(2):
            fn()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for fn, spent in zip(functions, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spent.append(1000 * (time.perf_counter() - start))
    return [statistics.median(spent) for spent in times]


def floor_work(model, batch, calls: dict[str, int], nudged: int, vjps: int, vjp_of: str) -> Callable[[], None]:
    """The estimate's evaluations, bare: ``calls["force"]`` relaxation steps from init_state, ``nudged`` steps with
    the nudge −β∇ₓC added (a nudged step's force): the ``calls["conservative"]`` steps of −∇E = F − N, where the
    nudged steps evaluate that instead of F (aep, :class:`~ep_core.protocols.DeclaresConservative`), and the first
    of the force steps for the rest; then ``calls["nonconservative"]`` evaluations of N, and ``vjps`` applications
    of a cached vjp of ``vjp_of`` (N, F or G) at the end point."""
    conservative = calls.get("conservative", 0)

    def work() -> None:
        terms = with_parameter_terms(model, batch)
        with torch.no_grad():
            x = model.init_state(terms)
            for k in range(calls.get("force", 0)):
                force = model.force(x, terms)
                if k < nudged - conservative:
                    force = nudged_force(model, terms, x, force, 0.01)
                x = step(model, terms, x, force)
            for _ in range(conservative):
                x = step(model, terms, x, nudged_force(model, terms, x, model.conservative(x, terms), 0.01))
            for _ in range(calls.get("nonconservative", 0)):
                model.nonconservative(x, terms)
        if vjps:
            maps = {"N": lambda s: model.nonconservative(s, terms), "F": lambda s: model.force(s, terms),
                    "G": relaxation_map(model, terms)}
            _, transpose = linearize(maps[vjp_of], x)
            with torch.no_grad():
                for _ in range(vjps):
                    # Each applied to x, not chained: u = (Jᵀ)^k x decays into float32 denormals on lm's attention
                    # after ~20 applications of J_Nᵀ, and each then costs 10–25× more on the CPU (2 against 20–55 ms),
                    # while the estimates apply it to vectors of their own size.
                    transpose(x)
    return work


def estimating(estimator, model, batch, device: torch.device) -> Callable[[], None]:
    """One eager estimate with seed 0's estimator generator, as the harness runs it."""
    return lambda: eager_estimate(estimator, model, batch, generator=generator(0, ESTIMATOR_STREAM, device))


def captured(work: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``work`` recorded once as a CUDA graph; the returned function replays it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return graph.replay


def run(models: list[str], device_name: str, repeats: int) -> dict[str, Any]:
    registry = load()
    device = torch.device(device_name)
    modes = ("eager", "captured") if device.type == "cuda" else ("eager",)
    rows = []
    for model_name in models:
        problem_spec = PROBLEMS[model_name]
        problem = build_problem(registry, model_name, ESTIMATORS, settings=problem_spec["settings"],
                                model_settings=problem_spec["model_settings"], device=device_name,
                                warn=lambda m: print(m, file=sys.stderr))
        batch = problem.batch().batch
        for label, estimator in problem.estimators.items():
            eager = None
            for mode in modes:
                # Eagerly, the estimate is timed here, by turns with its floor; captured, a replay needs the
                # harness's graph, and the GPU's pace does not drift as a shared CPU's does.
                m = measure(estimator, problem.model, batch, seed=0, repeats=1 if mode == "eager" else repeats,
                            warmup=2, eager=mode == "eager")
                eager = eager or m.estimate
                forces = m.calls.get("force", 0) + m.calls.get("nonconservative", 0)
                vjps = m.estimate.stats.to_dict().get("vjp_evals", problem.model.dynamics.T1 if label == "bptt" else 0)
                vjp_of = "N" if label == "aep" and isinstance(problem.model, DeclaresNonconservative) else (
                    "F" if label == "aep" else "G")
                cfg = estimator.config.to_dict()
                nudged = cfg["T2"] * (2 if cfg["centered"] else 1) if label in ("ep", "aep") else 0
                work = floor_work(problem.model, batch, m.calls, nudged, vjps, vjp_of)
                if mode == "eager":
                    ms, floor = timed([estimating(estimator, problem.model, batch, device), work], device, repeats)
                else:
                    ms, floor = statistics.median(m.ms), timed([captured(work, device)], device, repeats)[0]
                cosine = gradient_metrics(m.estimate.grads, eager.grads, problem.model.parameter_groups())["cosine"]
                rows.append({"model": model_name, "estimator": label, "mode": m.mode, "ms": ms, "floor_ms": floor,
                             "x_floor": ms / floor, "force_evals": forces, "vjp_evals": vjps,
                             "conservative_evals": m.calls.get("conservative", 0),
                             "cosine_to_eager": cosine, "peak_memory_bytes": m.peak_memory_bytes})
                print(f"{model_name:4} {label:8} {m.mode:9} {ms:9.2f} ms  floor {floor:9.2f} ms  "
                      f"{ms / floor:5.2f}×  cos→eager {cosine:.8f}", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"format": "epx.speed/1", "device": device_name, "device_name": name, "threads": torch.get_num_threads(),
            "repeats": repeats, "problems": {m: PROBLEMS[m] for m in models}, "environment": environment(),
            "rows": rows}


def failures(result: dict[str, Any]) -> list[str]:
    bound = BOUND["cuda" if result["device"].startswith("cuda") else "cpu"]
    default_mode = "captured" if result["device"].startswith("cuda") else "eager"
    found = []
    for row in result["rows"]:
        where = f"{row['model']} {row['estimator']} ({row['mode']})"
        if row["estimator"] in EP_FAMILY and row["mode"] == default_mode and row["x_floor"] > bound:
            found.append(f"{where}: {row['x_floor']:.2f}× its floor, above {bound}×")
        if row["cosine_to_eager"] is not None and row["cosine_to_eager"] < 1 - COSINE_TOL:
            found.append(f"{where}: cosine {row['cosine_to_eager']:.8f} to the eager estimate")
    return found


def evaluations(row: dict[str, Any]) -> str:
    """F (and N) evaluations, and those of −∇E alone where the nudged steps took that instead."""
    conservative = row.get("conservative_evals", 0)
    return f"{row['force_evals']}" + (f" + {conservative} of −∇E" if conservative else "")


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| device | model | estimator | mode | ms/grad | floor ms | × floor | F evals | vjps | cos to eager |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        device = result["device_name"] + ("" if result["device"].startswith("cuda")
                                          else f", {result['threads']} thread(s)")
        for row in result["rows"]:
            lines.append(f"| {device} | {row['model']} | {row['estimator']} | {row['mode']} | {row['ms']:.2f} | "
                         f"{row['floor_ms']:.2f} | {row['x_floor']:.2f} | {evaluations(row)} | "
                         f"{row['vjp_evals']} | {row['cosine_to_eager']:.7f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default="lm,cet")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (as the CLI's --threads)")
    parser.add_argument("--out")
    parser.add_argument("--table", nargs="+", metavar="FILE", help="print the README table of these results")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(open(path, encoding="utf-8").read()) for path in args.table]))
        return 0
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(PROBLEMS))
    if unknown:
        parser.error(f"unknown models {unknown}; valid: {', '.join(PROBLEMS)}")
    result = run(models, args.device, args.repeats)
    text = json.dumps(result, indent=1, allow_nan=False)
    if args.out:
        write_atomic(args.out, text + "\n")
    print(table([result]))
    found = failures(result)
    for line in found:
        print(f"FAIL {line}", file=sys.stderr)
    return 3 if found else 0


if __name__ == "__main__":
    sys.exit(main())
