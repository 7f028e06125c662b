"""What the results scripts share: `epx` training runs, two at a time (one per core of the 2-core machines they
are made on), each into a scratch directory that the script then keeps what it reads from."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path


def train_two_at_a_time(jobs: Mapping[str, list[str]], keep: Callable[[str, Path], None], *, prefix: str) -> None:
    """Run ``epx ARGS --out SCRATCH/NAME`` for every ``NAME: ARGS`` of ``jobs``, two at a time, in order; as each
    finishes, ``keep(NAME, SCRATCH/NAME)``. A run that fails stops the script, naming it."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    pending = list(jobs)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < 2:
            name = pending.pop(0)
            args = [*jobs[name], "--out", str(scratch / name)]
            print("$ epx " + shlex.join(args), file=sys.stderr, flush=True)
            running.append((name, subprocess.Popen([sys.executable, "-m", "epx_cli", *args],
                                                   stdout=subprocess.DEVNULL)))
        name, process = running.pop(0)
        if process.wait() != 0:
            raise SystemExit(f"{name} exited {process.returncode}")
        keep(name, scratch / name)
    shutil.rmtree(scratch)
