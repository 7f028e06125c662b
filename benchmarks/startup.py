"""Start-up time of the command line: this checkout against an earlier revision, in one run, and whether torch is
imported at all.

    python benchmarks/startup.py --baseline dad643d --runs 7 --out benchmarks/startup.json

The baseline's tree is extracted with `git archive` into a temporary directory and run with the same interpreter
and site-packages: its packages come first on PYTHONPATH, and a metadata directory there gives its own entry
points (those of its pyproject.toml and of its example plugin), so each side loads its own plugins. Python runs
with -P: otherwise the working directory comes first on sys.path and a run from the checkout imports the
checkout's ep_core under the baseline's plugins (before 2026-12-03 both benchmarks did). Runs of the two
alternate, so that a change in the machine's load falls on both; the report is the median wall time of each command
and the ratio baseline / now. `-X importtime` tells whether torch was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["compare", "--help"], ["train", "--help"], ["list"], ["plugins"])
PACKAGES = (("epx", "pyproject.toml", (".", "plugins", "cli")),
            ("epx-phantom", "docs/examples/epx-example-plugin/pyproject.toml",
             ("docs/examples/epx-example-plugin/src",)))


def extract(revision: str, into: Path) -> Path:
    tree = into / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def environment_for(tree: Path, site: Path) -> dict[str, str]:
    """PYTHONPATH that makes ``tree``'s packages, and their entry points, shadow the installed ones."""
    site.mkdir()
    paths = [str(site)]
    for name, pyproject, roots in PACKAGES:
        project = tomllib.loads((tree / pyproject).read_text())["project"]
        info = site / f"{name.replace('-', '_')}-{project['version']}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {project['version']}\n")
        groups = project.get("entry-points", {})
        lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
                 for group, entries in groups.items()]
        (info / "entry_points.txt").write_text("\n".join(lines))
        paths += [str(tree / root) for root in roots]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "EPX_THREADS": "1"}
    check_isolated(env, tree)
    return env


PYTHON = (sys.executable, "-P")
"""-P keeps the working directory off sys.path, so that PYTHONPATH decides which tree's packages load."""
MODULES = ("ep_core", "epx_estimators", "epx_cli", "epx_phantom")


def check_isolated(env: dict[str, str], tree: Path) -> None:
    """Exit unless every package of the project loads from ``tree`` under ``env``."""
    probe = "import importlib, sys; print('\\n'.join(importlib.import_module(m).__file__ for m in sys.argv[1:]))"
    done = subprocess.run([*PYTHON, "-c", probe, *MODULES], env=env, capture_output=True, text=True)
    outside = [line for line in done.stdout.splitlines() if not Path(line).resolve().is_relative_to(tree.resolve())]
    if done.returncode != 0 or outside:
        raise SystemExit(f"the baseline's packages do not all load from {tree}: {outside or done.stderr[-1000:]}")


def run(args: list[str], env: dict[str, str]) -> tuple[float, bool]:
    """(wall seconds, whether torch was imported) of one `python -m epx_cli ARGS`."""
    started = time.perf_counter()
    result = subprocess.run([*PYTHON, "-X", "importtime", "-m", "epx_cli", *args], env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"epx {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    imported = any(line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == "torch"
                   for line in result.stderr.splitlines())
    return seconds, imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare with, e.g. dad643d")
    parser.add_argument("--runs", type=int, default=7, help="runs of each command on each side")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    options = parser.parse_args()
    sides = {"now": {**os.environ, "EPX_THREADS": "1"}}
    with tempfile.TemporaryDirectory() as scratch:
        tree = extract(options.baseline, Path(scratch))
        sides["baseline"] = environment_for(tree, Path(scratch) / "site")
        results = []
        for args in COMMANDS:
            times: dict[str, list[float]] = {side: [] for side in sides}
            torch_imported: dict[str, bool] = {}
            for env in sides.values():  # one untimed run each: a cold first call is not a speed
                run(args, env)
            for _ in range(options.runs):
                for side, env in sides.items():
                    seconds, torch_imported[side] = run(args, env)
                    times[side].append(seconds)
            medians = {side: statistics.median(values) for side, values in times.items()}
            results.append({"command": "epx " + " ".join(args), "median_s": medians,
                            "ratio_baseline_over_now": medians["baseline"] / medians["now"],
                            "torch_imported": torch_imported, "runs": times})
            print(f"epx {' '.join(args):16} baseline {medians['baseline']:.2f} s (torch "
                  f"{'yes' if torch_imported['baseline'] else 'no'})  now {medians['now']:.2f} s (torch "
                  f"{'yes' if torch_imported['now'] else 'no'})  ratio {medians['baseline'] / medians['now']:.1f}x")
    report = {"baseline": options.baseline, "runs": options.runs, "python": sys.version.split()[0],
              "results": results}
    if options.out is not None:
        sys.path.insert(0, str(REPO))
        from ep_core.files import write_atomic

        write_atomic(options.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
