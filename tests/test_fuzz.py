"""Malformed invocations of every command, each of which must end in a clear error: the documented exit code,
exactly one `error:` line on stderr, no traceback, nothing written where nothing should be, and a bounded run
time. Files read back (sweep JSON, run.json, log.jsonl, checkpoint.pt, data files) are corrupted on purpose."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from epx_cli import main as cli_main

SMALL_CET = ["--model-set", "dim=16", "--model-set", "heads=2", "--model-set", "head_dim=8",
             "--model-set", "memories=16", "--model-set", "T1=40", "--batch-size", "4", "--repeats", "1"]
TOY_TRAIN = ["train", "aep", "--model", "toy", "--batch-size", "4", "--steps", "4", "--checkpoint-every", "2",
             "--eval-every", "2", "--diagnose-every", "0"]
SECONDS = 60  # far above any of these; a hang, or work started before the check, shows as a failure
SEED_MAX = 2**32 - 1


@dataclass
class Case:
    args: list[str]
    code: int
    fragment: str
    files: dict[str, object] = field(default_factory=dict)
    """Files to create in the working directory first: text, bytes, JSON-able values, or "run" for a copy of a
    finished 4-step toy run directory (see ``run_dir``)."""
    env: dict[str, str] = field(default_factory=dict)


def sweep_file(**changes: object) -> dict:
    """A valid one-point sweep file for ``SWEEP`` with ``changes`` applied to its top level."""
    spec = {"estimators": ["aep"], "model": "toy", "reference": "bptt", "settings": {}, "model_settings": {},
            "vary": ["beta=0.01"], "seeds": [0], "data": "auto", "batch_size": None, "dtype": "float32",
            "device": "cpu", "repeats": 1}
    record = {"id": json.dumps({"values": {"beta": "0.01"}, "seed": 0}, sort_keys=True),
              "values": {"beta": "0.01"}, "seed": 0, "status": "failed", "error": "diverged"}
    return {"format": "epx.sweep/1", "spec": spec, "axes": [], "records": [record], **changes}


SWEEP = ["sweep", "aep", "--model", "toy", "--vary", "beta=0.01", "--out", "s.json"]

CASES: dict[str, Case] = {
    # devices
    "device unknown to torch": Case(["compare", "aep", "--model", "toy", "--device", "tpu"], 2, "not a device"),
    "device meta": Case(["compare", "aep", "--model", "toy", "--device", "meta"], 2, "meta tensors hold no data"),
    "device empty": Case(["compare", "aep", "--model", "toy", "--device", ""], 2, "not a device"),
    "device cpu index": Case(["compare", "aep", "--model", "toy", "--device", "cpu:1"], 2, "takes no device index"),
    "device cuda index": Case(["compare", "aep", "--model", "toy", "--device", "cuda:99"], 2, "cuda:99"),
    "device in train": Case([*TOY_TRAIN, "--device", "tpu"], 2, "not a device"),
    "device in analyze": Case(["analyze", "fixed-point", "--model", "toy", "--device", "xla"], 2, "not on 'xla'"),
    # seeds
    "seed too large": Case(["compare", "aep", "--model", "toy", "--seed", str(SEED_MAX + 1)], 2, "--seed"),
    "seed negative": Case(["compare", "aep", "--model", "toy", "--seed", "-1"], 2, "--seed"),
    "seed not a number": Case(["compare", "aep", "--model", "toy", "--seed", "abc"], 2, "--seed"),
    "seeds past the range": Case([*SWEEP[:-2], "--seed", str(SEED_MAX), "--seeds", "2"], 2, "--seed/--seeds"),
    # output paths
    "out under a file": Case(["compare", "aep", "--model", "toy", "--out", "f.txt/r.json"], 2, "is a file",
                             files={"f.txt": "keep"}),
    "out is a directory": Case(["compare", "aep", "--model", "toy", "--out", "d"], 2, "is a directory",
                               files={"d/x": "keep"}),
    "plot under a file": Case([*SWEEP[:-2], "--plot", "f.txt/p.png"], 2, "is a file", files={"f.txt": "keep"}),
    "train out is a file": Case([*TOY_TRAIN, "--out", "f.txt"], 2, "not a directory", files={"f.txt": "keep"}),
    "analyze out under a file": Case(["analyze", "fixed-point", "--model", "toy", "--out", "f.txt/a.json"], 2,
                                     "is a file", files={"f.txt": "keep"}),
    "out that cannot be created": Case(["compare", "aep", "--model", "toy", "--repeats", "1", "--out",
                                        "/proc/epx-fuzz/r.json"], 1, "cannot write /proc/epx-fuzz/r.json"),
    # thresholds and numbers
    "min-cosine nan": Case(["compare", "aep", "--model", "toy", "--min-cosine", "nan"], 2, "not a finite number"),
    "min-cosine inf": Case(["compare", "aep", "--model", "toy", "--min-cosine", "inf"], 2, "not a finite number"),
    "min-cosine above 1": Case(["compare", "aep", "--model", "toy", "--min-cosine", "2"], 2, "outside [-1, 1]"),
    "estimator option nan": Case(["compare", "aep", "--model", "toy", "--set", "beta=nan"], 2, "not finite"),
    "threads zero": Case(["--threads", "0", "list"], 2, "--threads"),
    "repeats zero": Case(["compare", "aep", "--model", "toy", "--repeats", "0"], 2, "--repeats"),
    # batch sizes
    "batch larger than the data": Case(["compare", "aep", "--model", "cet", "--data", "sample", "--batch-size",
                                        "5000"], 2, "larger than the training data of 'sample', which has 2048"),
    "batch larger than memory": Case(["compare", "aep", "--model", "toy", "--batch-size", str(10**13)], 2,
                                     "more than the"),
    "batch zero": Case(["compare", "aep", "--model", "toy", "--batch-size", "0"], 2, "--batch-size"),
    "train batch larger than the data": Case(["train", "aep", "--model", "cet", "--data", "sample",
                                              "--batch-size", "2049"], 2, "larger than the"),
    # data
    "data dir missing": Case(["compare", "aep", "--model", "toy", "--data-dir", "nowhere"], 2, "does not exist"),
    "dataset unknown": Case(["compare", "aep", "--model", "cet", "--data", "mnist"], 2, "unknown dataset"),
    "dataset of the wrong kind": Case(["compare", "aep", "--model", "cet", "--data", "shakespeare"], 2,
                                      "choose a dataset of images"),
    "corrupt data file": Case(["compare", "aep", "--model", "cet", "--data", "fashionmnist", "--data-dir", ".",
                               "--no-download"], 1, "truncated",
                              files={"train-images-idx3-ubyte.gz": b"\x1f\x8b" + b"0" * 100,
                                     "train-labels-idx1-ubyte.gz": b"\x1f\x8b" + b"0" * 100}),
    # options in the wrong place, unknown names
    "model option given with --set": Case(["compare", "aep", "--model", "cet", "--set", "T1=400"], 2,
                                          "give it as --model-set T1=400"),
    "estimator option given with --model-set": Case(["compare", "aep", "--model", "cet", "--model-set",
                                                     "beta=0.1"], 2, "give it as --set beta=0.1"),
    "model option given with --set in train": Case([*TOY_TRAIN, "--set", "T1=10"], 2, "--model-set T1=10"),
    "malformed setting": Case(["compare", "aep", "--model", "toy", "--set", "beta"], 2, "expected KEY=VALUE"),
    "unknown model": Case(["compare", "aep", "--model", "cte"], 2, "did you mean 'cet'"),
    "no estimators": Case(["compare", "--model", "toy"], 2, "Missing argument"),
    "unknown flag": Case(["compare", "aep", "--model", "toy", "--frobnicate"], 2, "No such option"),
    "unknown command": Case(["comapre"], 2, "No such command"),
    "dtype half": Case(["compare", "aep", "--model", "toy", "--dtype", "float16"], 2, "--dtype"),
    "info of a command": Case(["info", "train"], 2, "is a command"),
    "info unknown": Case(["info", "adjiont"], 2, "did you mean 'adjoint'"),
    "list unknown kind": Case(["list", "plugins"], 2, "'plugins' is not one of 'datasets'"),
    # sweeps and their files
    "vary and model-set the same key": Case([*SWEEP[:-2], "--vary", "T1=10,20", "--model-set", "T1=10"], 2,
                                            "give it in one place"),
    "vary and set the same key": Case([*SWEEP[:-2], "--set", "beta=0.1"], 2, "give it in one place"),
    "vary malformed": Case(["sweep", "aep", "--model", "toy", "--vary", "beta"], 2, "expected KEY=v1,v2"),
    "sweep file not JSON": Case(SWEEP, 1, "invalid JSON", files={"s.json": "not json"}),
    "sweep file truncated": Case(SWEEP, 1, "truncated", files={"s.json": json.dumps(sweep_file())[:200]}),
    "sweep file empty": Case(SWEEP, 1, "empty", files={"s.json": ""}),
    "sweep file of the wrong type": Case(SWEEP, 1, "holds a list", files={"s.json": [1, 2]}),
    "sweep file of another format": Case(SWEEP, 1, "format 'epx.comparison/1'",
                                         files={"s.json": sweep_file(format="epx.comparison/1")}),
    "sweep file without records": Case(SWEEP, 1, "'records' list", files={"s.json": sweep_file(records=None)}),
    "sweep file with a bad record": Case(SWEEP, 1, "record 1", files={"s.json": sweep_file(records=[{"id": 1}])}),
    "sweep file of another sweep": Case([*SWEEP, "--seed", "3"], 2, "holds a different sweep",
                                        files={"s.json": sweep_file()}),
    # the conformance suite
    "check suite out of range": Case(["check", "aep", "--suite", "99"], 2, "--suite"),
    "check unknown check": Case(["check", "aep", "--check", "determinstic"], 2, "unknown check"),
    "check unknown estimator": Case(["check", "aepp"], 2, "did you mean 'aep'"),
    # training and resuming
    "resume without out": Case(["train", "--resume"], 2, "--resume needs --out"),
    "train without estimator": Case(["train", "--model", "toy"], 2, "Missing argument 'ESTIMATOR'"),
    "resume an empty directory": Case(["train", "--resume", "--out", "d"], 2, "holds no run", files={"d/x": ""}),
    "resume with other options": Case(["train", "--resume", "--out", "run", "--lr", "0.1", "--seed", "5"], 2,
                                      "--seed: 0 in run.json, 5 given; --lr: 0.003 in run.json, 0.1 given",
                                      files={"run": "run"}),
    "train into an existing run": Case([*TOY_TRAIN, "--out", "run"], 2, "already holds a run", files={"run": "run"}),
    "run.json not JSON": Case(["train", "--resume", "--out", "run"], 1, "run.json: not an epx.run/1",
                              files={"run": "run", "run/run.json": "{"}),
    "run.json of the wrong type": Case(["train", "--resume", "--out", "run"], 1, "holds a list",
                                       files={"run": "run", "run/run.json": []}),
    "run.json missing keys": Case(["train", "--resume", "--out", "run"], 1, "incomplete run description",
                                  files={"run": "run", "run/run.json": {"format": "epx.run/1", "seed": 0}}),
    "checkpoint not a checkpoint": Case(["train", "--resume", "--out", "run"], 1, "not a readable epx checkpoint",
                                        files={"run": "run", "run/checkpoint.pt": b"\x00garbage"}),
    "checkpoint truncated": Case(["train", "--resume", "--out", "run"], 1, "not a readable epx checkpoint",
                                 files={"run": "run", "run/checkpoint.pt": "truncate"}),
    "checkpoint with wrong shapes": Case(["train", "--resume", "--out", "run"], 1, "wrong shape",
                                         files={"run": "run", "run/checkpoint.pt": "reshape"}),
    "checkpoint with a wrong entry": Case(["train", "--resume", "--out", "run"], 1, "without a valid 'rng'",
                                          files={"run": "run", "run/checkpoint.pt": "no-rng"}),
    "log with a corrupt line": Case(["train", "--resume", "--out", "run"], 1, "line 2 is not JSON",
                                    files={"run": "run", "run/log.jsonl": "corrupt-line"}),
    # runtime failures and thresholds
    "relaxation diverges": Case(["compare", "aep", "--model", "cet", "--data", "sample", "--model-set", "eps=5",
                                 *SMALL_CET], 1, "diverged at step"),
    "cosine threshold missed": Case(["compare", "ep", "--model", "toy", "--model-set", "conservative=false",
                                     "--set", "T2=2", "--min-cosine", "0.9999", "--repeats", "1"], 3,
                                    "cosine below 0.9999 for: ep"),
    "strict mode and a broken plugin": Case(["list"], 1, "failed at import", env={"EPX_STRICT_PLUGINS": "1"}),
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 4-step toy run stopped after its step-2 checkpoint (run.json, log.jsonl, checkpoint.pt), as TOY_TRAIN
    --out would leave it after Ctrl-C; made once for every case that needs one."""
    from ep_core.plugins import load
    from ep_core.train import Interrupted, Progress, build_run, train

    path = tmp_path_factory.mktemp("run") / "run"
    run = build_run(load(), "aep", "toy", batch_size=4,
                    train_settings={"steps": "4", "checkpoint_every": "2", "eval_every": "2", "diagnose_every": "0"})
    progress = Progress()
    progress.on_record = lambda record: record["step"] == 2 and progress.stop.set()
    with pytest.raises(Interrupted):
        train(run, directory=path, progress=progress)
    assert torch.load(path / "checkpoint.pt", weights_only=True)["step"] == 2
    return path


def corrupt(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif how in ("reshape", "no-rng"):
        payload = torch.load(path, weights_only=True)
        if how == "reshape":
            payload["model"] = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:], dtype=v.dtype)
                                for k, v in payload["model"].items()}
        else:
            payload["rng"] = [1, 2]
        torch.save(payload, path)
    elif how == "corrupt-line":
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0], lines[1][:5], *lines[2:]]) + "\n")
    else:
        raise AssertionError(how)


def make_files(root: Path, files: dict[str, object], run_dir: Path) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "run":
            shutil.copytree(run_dir, path)
        elif content in ("truncate", "reshape", "no-rng", "corrupt-line"):
            corrupt(path, content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """An installed distribution whose plugin module fails on import."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_epx_fuzz.py").write_text("raise RuntimeError('boom')\n")
    info = site / "broken_epx_fuzz-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-epx-fuzz\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[epx]\nbroken = broken_epx_fuzz\n")
    monkeypatch.syspath_prepend(str(site))


def test_there_are_enough_cases_across_every_command():
    commands = {case.args[0] if not case.args[0].startswith("--") else case.args[2] for case in CASES.values()}
    assert len(CASES) >= 40
    assert {"compare", "sweep", "train", "analyze", "check", "info", "list"} <= commands


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_invocation_is_one_clear_error(name, run_dir, tmp_path, monkeypatch, request):
    case = CASES[name]
    if name == "strict mode and a broken plugin":
        request.getfixturevalue("broken_plugin")
    work = tmp_path / "work"
    work.mkdir()
    make_files(work, case.files, run_dir)
    before = snapshot(work)
    monkeypatch.chdir(work)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    cli_main.registry.cache_clear()
    started = time.monotonic()
    result = CliRunner().invoke(cli_main.cli, case.args)
    elapsed = time.monotonic() - started
    cli_main.registry.cache_clear()

    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        f"{name}: raised {type(result.exception).__name__}: {result.exception}")
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exit_code == case.code, f"{name}: exit {result.exit_code}\n{result.stderr}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"{name}: expected one error line, got\n{result.stderr}"
    assert case.fragment in " ".join(result.stderr.split()), f"{name}: {case.fragment!r} not in\n{result.stderr}"
    assert snapshot(work) == before, f"{name}: files were written or changed"
    assert elapsed < SECONDS


def test_read_only_output_directory_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cli_main.registry.cache_clear()
    result = CliRunner().invoke(cli_main.cli, ["compare", "aep", "--model", "toy", "--out", str(locked / "r.json")])
    assert result.exit_code == 2 and "no permission to write" in result.stderr


def test_created_parents_are_reported(tmp_path):
    out = tmp_path / "a" / "b" / "r.json"
    cli_main.registry.cache_clear()
    result = CliRunner().invoke(cli_main.cli, ["compare", "aep", "--model", "toy", "--repeats", "1", "--json",
                                               "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert f"wrote {out} (created {tmp_path / 'a'}, {tmp_path / 'a' / 'b'})" in " ".join(result.stderr.split())
    assert json.loads(out.read_text())["format"] == "epx.comparison/1"


def epx_process(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "epx_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "EPX_THREADS": "1"}, **kwargs)


def test_ctrl_c_in_a_comparison_exits_130_with_one_interrupted_line(tmp_path):
    process = epx_process("compare", "ep", "aep", "adjoint", "--model", "cet", "--data", "sample", "--repeats", "50",
                          "--out", str(tmp_path / "r.json"))
    time.sleep(10)  # past start-up, inside the measurements, which take minutes with 50 repeats
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line.startswith("interrupted:")] == [
        "interrupted: by the user (Ctrl-C); nothing was kept"]
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert not (tmp_path / "r.json").exists()
