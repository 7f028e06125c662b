import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Same reason as the CLI's --threads default: small-tensor relaxations crawl when OpenMP threads contend.
torch.set_num_threads(1)

# Tables are laid out for $COLUMNS when it is set; the tests that read tables expect the pipe default.
os.environ.pop("COLUMNS", None)

# Tests read real data from ../shared/data unless the caller points elsewhere. A relative EPX_DATA_DIR is made
# absolute: the loaders report the paths they resolved, and the tests' subprocesses may run in other folders.
if os.environ.get("EPX_DATA_DIR"):
    os.environ["EPX_DATA_DIR"] = str(Path(os.environ["EPX_DATA_DIR"]).resolve())
elif "EPX_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["EPX_DATA_DIR"] = str(SHARED_DATA)


@pytest.fixture
def real_data_dir() -> Path:
    path = Path(os.environ.get("EPX_DATA_DIR", SHARED_DATA))
    if not (path / "fashion-mnist").is_dir() and not any(path.glob("train-images-idx3-ubyte*")):
        pytest.skip(f"Fashion-MNIST not found under {path}; set EPX_DATA_DIR")
    return path


@pytest.fixture
def interrupt_epx() -> Callable[..., list[str]]:
    """``interrupt_epx(args, ready)``: start ``epx ARGS`` in a process, send it SIGINT once ``ready()`` holds, and
    return the command its one ``interrupted:`` line says continues the work (after checking exit 130 and that no
    traceback was printed)."""
    def interrupt(args: list[str], ready: Callable[[], bool]) -> list[str]:
        process = subprocess.Popen([sys.executable, "-m", "epx_cli", *args], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "EPX_THREADS": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ready():
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stderr = process.communicate(timeout=60)[1]
        assert process.returncode == 130, stderr
        assert "Traceback" not in stderr
        [line] = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
        return shlex.split(line.split("to continue, run: ", 1)[1])
    return interrupt
