"""CPU time per gradient of every estimator: this checkout against an earlier revision, in one run.

    EPX_DATA_DIR=../shared/data python benchmarks/regression.py --baseline 2426532 --rounds 3 --out FILE

Each side runs `epx compare ep aep adjoint --model M --json` (bptt is the reference, so it is measured too) on lm
at seed 002's settings (aep clip 1) and on cet's defaults, one torch thread, in its own process with its own
packages and entry points (the baseline's tree from `git archive`, as benchmarks/startup.py does). Rounds
alternate the sides, so that a change in the machine's load falls on both; the report is each estimator's median
over the rounds of its median ms per gradient, and the ratio now / baseline. Exit 3 when an estimator is more
than 5% slower now.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import PYTHON, environment_for, extract  # noqa: E402  (a sibling script, not a package)

from ep_core.files import write_atomic  # noqa: E402

PROBLEMS = {"lm": ["--set", "aep.clip=1"], "cet": []}
ESTIMATORS = ("ep", "aep", "adjoint")
SLOWER = 1.05


def compare(model: str, env: dict[str, str] | None, repeats: int) -> dict[str, float]:
    """{estimator: median ms per gradient} of one `epx compare` on ``model``."""
    command = [*PYTHON, "-m", "epx_cli", "compare", *ESTIMATORS, "--model", model, *PROBLEMS[model],
               "--repeats", str(repeats), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return {row["label"]: row["ms_median"] for row in json.loads(done.stdout)["results"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per estimator in each compare")
    parser.add_argument("--models", default=",".join(PROBLEMS), help="comma-separated, of: " + ", ".join(PROBLEMS))
    parser.add_argument("--out")
    args = parser.parse_args()
    models = args.models.split(",")
    if not set(models) <= set(PROBLEMS):
        parser.error(f"unknown models {sorted(set(models) - set(PROBLEMS))}; valid: {', '.join(PROBLEMS)}")
    with tempfile.TemporaryDirectory() as scratch:
        tree = extract(args.baseline, Path(scratch))
        sides = {"baseline": environment_for(tree, Path(scratch) / "site"), "now": None}
        times: dict[tuple[str, str, str], list[float]] = {}
        for round_ in range(args.rounds):
            for side, env in sides.items() if round_ % 2 == 0 else reversed(list(sides.items())):
                for model in models:
                    for label, ms in compare(model, env, args.repeats).items():
                        times.setdefault((side, model, label), []).append(ms)
                    print(f"round {round_ + 1} {side} {model} done", file=sys.stderr, flush=True)
    rows = []
    for (side, model, label), values in times.items():
        if side != "now":
            continue
        before = statistics.median(times[("baseline", model, label)])
        after = statistics.median(values)
        rows.append({"model": model, "estimator": label, "baseline_ms": before, "now_ms": after,
                     "ratio": after / before})
    result = {"format": "epx.regression/1", "baseline": args.baseline, "rounds": args.rounds,
              "repeats": args.repeats, "rows": rows}
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"| model | estimator | {args.baseline} ms | now ms | now / {args.baseline} |\n|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['estimator']} | {row['baseline_ms']:.1f} | {row['now_ms']:.1f} | "
              f"{row['ratio']:.2f} |")
    slower = [f"{r['model']} {r['estimator']}" for r in rows if r["ratio"] > SLOWER]
    if slower:
        print(f"FAIL more than {SLOWER - 1:.0%} slower: {', '.join(slower)}", file=sys.stderr)
    return 3 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
