"""Problems measured together: `compare --seeds N` against `--seeds 1`, stacked (ep_core.batching) and not, in one run.

    python benchmarks/seeds.py --device cuda [--seeds 8] [--repeats 10] [--set aep.clip=1 ...] [--out FILE]
    python benchmarks/seeds.py --device cuda --vary s=0.25,0.5,1,2 [--out FILE]      (or --vary beta=...)

For each estimator of ep, aep and bptt (the reference) on lm's defaults, seed 0 upwards (with ``--vary``: seed 0
at each value of a knob that stacks, lm's s, c or ε or the estimators' β, the grid points of a sweep over it): the
median ms of one timed run of all N problems together (the harness's timing of a group, what `compare --seeds N`
reports), with N = 1 (the first problem alone) and N problems; the group as the runner chooses it (the faster of
the stacked graph and the graph with one stream per problem), stacked (ep_core.batching) and side by side; and
each problem's cosine and relative error against those of its own separate run, in all three. Then, for seeds,
the wall time of the whole `epx compare ep aep bptt --model lm --seeds N` command against `--seeds 1`, each run
twice in turn.

Exit 3 unless every chosen group's time is at most 2× its N = 1 time and every per-problem number equals the
separate run's to 1e-5.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from ep_core.files import write_atomic
from ep_core.harness import environment
from ep_core.models.lm import LMConfig
from ep_core.plugins import load
from ep_core.session import parse_settings, run_problem_comparisons
from ep_core.sweep import parse_vary

ESTIMATORS = ["ep", "aep"]
REFERENCE = "bptt"
BOUND = 2.0
TOL = 1e-5


def group_times(comparisons) -> dict[str, float]:
    return {r.label: r.ms_median for r in comparisons[0].results}


def numbers(comparison) -> dict[str, dict[str, float]]:
    return {r.label: {"cosine": r.metrics["cosine"], "rel_error": r.metrics["rel_error"]}
            for r in comparison.results[1:]}


def command_seconds(seeds: int, device: str, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "epx_cli", "compare", *ESTIMATORS, REFERENCE, "--model", "lm", "--seeds",
                    str(seeds), "--device", device, *extra], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "NO_COLOR": "1"})
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--vary", help="KEY=v1,v2,...: seed 0 at each value of a knob that stacks (lm's s, c or "
                                       "eps, the estimators' beta), not N seeds")
    parser.add_argument("--set", dest="settings", action="append", default=[])
    parser.add_argument("--out")
    args = parser.parse_args()
    registry = load()
    settings = parse_settings(args.settings, "--set")
    if args.vary:
        key, values = parse_vary(args.vary)
        on_model = key in {f.name for f in dataclasses.fields(LMConfig)}
        problems = [({}, {key: value}, 0) if on_model else ({key: value}, {}, 0) for value in values]
    else:
        problems = [({}, {}, seed) for seed in range(args.seeds)]
    n = len(problems)

    def run(group, **options):
        return run_problem_comparisons(registry, [REFERENCE, *ESTIMATORS], "lm",
                                       problems=[({**settings, **mine}, model, seed) for mine, model, seed in group],
                                       device=args.device, repeats=args.repeats, **options)

    one = run(problems[:1])
    chosen = run(problems)
    streams = run(problems, stacking=False)
    stacks = run(problems, stacking=True)
    alone = [run([problem])[0] for problem in problems]

    largest = 0.0
    for together, single in zip([*chosen, *stacks, *streams], alone * 3):
        for label, values in numbers(together).items():
            for key, value in values.items():
                largest = max(largest, abs(value - numbers(single)[label][key]))
    times = {"1": group_times(one), "chosen": group_times(chosen), "stacked": group_times(stacks),
             "streams": group_times(streams)}
    modes = {r.label: r.execution for r in chosen[0].results}
    ratios = {label: times["chosen"][label] / times["1"][label] for label in times["1"]}

    walls: dict[str, list[float]] = {}
    if not args.vary:
        extra = [item for pair in (("--set", s) for s in args.settings) for item in pair]
        walls = {"1": [], str(n): []}
        for _ in range(2):
            walls["1"].append(command_seconds(1, args.device, extra))
            walls[str(n)].append(command_seconds(n, args.device, extra))
    wall = {key: statistics.median(values) for key, values in walls.items()}

    what = f"seed 0 at {args.vary}" if args.vary else f"seeds 0-{n - 1}"
    print(f"lm defaults{' with ' + ', '.join(args.settings) if args.settings else ''}, {what}, {args.device}: "
          f"median ms of one run of the group")
    print(f"{'estimator':<10} {'N=1':>8} {'chosen':>9} {f'N={n}':>8} {'ratio':>6} {'stacked':>8} "
          f"{'ratio':>6} {'streams':>8} {'ratio':>6}")
    for label in times["1"]:
        cells = [f"{times[kind][label]:8.2f} {times[kind][label] / times['1'][label]:6.2f}"
                 for kind in ("chosen", "stacked", "streams")]
        print(f"{label:<10} {times['1'][label]:8.2f} {modes[label]:>9} {'  '.join(cells)}")
    print(f"largest per-problem difference (cosine, rel error) from separate runs: {largest:.2e}")
    if wall:
        print(f"whole command: --seeds 1 {wall['1']:.1f} s, --seeds {n} {wall[str(n)]:.1f} s "
              f"({wall[str(n)] / wall['1']:.2f}x)")
    ok = largest <= TOL and all(ratio <= BOUND for ratio in ratios.values())
    if args.out:
        write_atomic(args.out, json.dumps({"environment": environment(), "problems": problems,
                                           "settings": args.settings, "ms": times, "modes": modes,
                                           "ratios": ratios, "largest_difference": largest, "command_s": walls},
                                          indent=2))
    print("ok" if ok else "FAIL")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
