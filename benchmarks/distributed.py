"""Scaling under torchrun: a sweep's throughput and data-parallel training steps per second, one process against N,
in one run.

    EPX_DATA_DIR=../shared/data python benchmarks/distributed.py --processes 2 --device cpu --out FILE
    python benchmarks/distributed.py --processes 2 --device cuda --out FILE      (a machine with ≥ 2 GPUs)

Sweep: the same grid (lm at seed 002's settings, ep and aep against bptt, --vary beta over ``--points`` values), run
by `epx sweep` in one process and by `torchrun --nproc-per-node N -m epx_cli sweep`. Each run starts from an empty
--out. The throughput ratio is wall(1) / wall(N), both whole commands, start-up included. That is what a user
waits for, and the grid is long enough for start-up to be small.

Training: `epx train ep --model lm` for ``--steps`` steps with batch B in one process, and with the global batch
N·B under torchrun (the same work per device). Steps per second are the whole run's with start-up subtracted:
each side also runs the same command with a fifth of the steps, and the difference between the two wall times
is divided by the difference in steps. Validation, diagnostics and checkpoints are off. The ratio reported is of
samples per second (steps per second × global batch): with N devices doing N times the work per step, ideal
scaling is N.

On the CPU the processes share the machine's cores, one torch thread each. So the CPU ratios say how well the
work splits, not what more devices buy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ep_core.files import write_atomic

LM = ["--model", "lm"]
SEED_002 = ["--set", "aep.clip=1"]
"""Seed 002's aep option, for the sweep's comparisons (training runs ep)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "epx_cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "-m", "epx_cli", *args]


def timed(command: list[str]) -> float:
    env = {**os.environ, "EPX_THREADS": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def sweep_seconds(processes: int, points: int, device: str, scratch: Path) -> float:
    betas = ",".join(f"{0.005 * (i + 1):g}" for i in range(points))
    out = scratch / f"sweep-{processes}.json"
    return timed(launch(["sweep", "ep", "aep", *LM, *SEED_002, "--vary", f"beta={betas}", "--device", device, "--out",
                         str(out)], processes))


def train_seconds(processes: int, steps: int, batch: int, device: str, scratch: Path) -> float:
    directory = scratch / f"train-{processes}-{steps}"
    return timed(launch(["train", "ep", *LM, "--steps", str(steps), "--batch-size", str(batch * processes),
                         "--device", device, "--eval-every", str(steps), "--eval-batches", "1",
                         "--diagnose-every", "0", "--checkpoint-every", str(steps), "--out", str(directory)],
                        processes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--points", type=int, default=8, help="grid points of the sweep")
    parser.add_argument("--steps", type=int, default=50, help="training steps of the long run")
    parser.add_argument("--batch", type=int, default=16, help="batch per process")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.processes < 2:
        parser.error("--processes must be at least 2")
    short = max(1, args.steps // 5)
    results: dict[str, dict] = {"sweep": {}, "train": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for processes in (1, args.processes):
            seconds = sweep_seconds(processes, args.points, args.device, Path(scratch))
            results["sweep"][processes] = {"seconds": seconds, "points_per_s": args.points / seconds}
            print(f"sweep, {processes} process(es): {args.points} points in {seconds:.1f} s", file=sys.stderr)
        for processes in (1, args.processes):
            long = train_seconds(processes, args.steps, args.batch, args.device, Path(scratch))
            brief = train_seconds(processes, short, args.batch, args.device, Path(scratch))
            rate = (args.steps - short) / (long - brief)
            results["train"][processes] = {"global_batch": args.batch * processes, "steps_per_s": rate,
                                           "samples_per_s": rate * args.batch * processes}
            print(f"train, {processes} process(es), global batch {args.batch * processes}: {rate:.2f} steps/s",
                  file=sys.stderr)
    one, many = results["sweep"][1], results["sweep"][args.processes]
    report = {
        "device": args.device, "processes": args.processes, "cpus": os.cpu_count(), **results,
        "sweep_throughput_ratio": many["points_per_s"] / one["points_per_s"],
        "train_samples_per_s_ratio": (results["train"][args.processes]["samples_per_s"]
                                      / results["train"][1]["samples_per_s"]),
    }
    text = json.dumps(report, indent=1) + "\n"
    if args.out:
        write_atomic(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
