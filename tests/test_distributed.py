"""ep_core.distributed and epx under torchrun: the data-parallel identity in one process, then sweeps and training
as two gloo processes on the CPU, compared with one process; a rank killed or frozen mid-job."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ep_core.capture import eager_estimate
from ep_core.config import ConfigError
from ep_core.distributed import ONE_PROCESS, World, cost_share, joined, shard
from ep_core.errors import UsageError
from ep_core.harness import init_state
from ep_core.plugins import load
from ep_core.session import build_problem

TIMING = ("ms", "ms_median", "environment", "peak_memory_bytes", "shared_measurement")
ENV = {**os.environ, "EPX_THREADS": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], *, processes: int = 2, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
            "127.0.0.1", "--master-port", str(port or free_port()), "-m", "epx_cli", *args]


def epx(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "epx_cli", *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def shards(batch, parts: int):
    size = next(iter(batch.values())).shape[0] // parts
    return [{k: v[r * size:(r + 1) * size] for k, v in batch.items()} for r in range(parts)]


# --- the identity, in one process ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ep", "aep", "adjoint", "bptt"])
def test_the_shares_of_an_equilibrium_cost_sum_to_the_one_process_estimate(name):
    """With the cost scaled by b/B on each shard, the finite-β EP family gives the whole batch's estimate, not
    only its limit: without the share, each sample would be nudged W times harder."""
    problem = build_problem(load(), "toy", [name], model_settings={"conservative": "false", "T1": "200"},
                            batch_size=24, seed=1, dtype="float64")
    model, batch, estimator = problem.model, problem.batch().batch, problem.estimators[name]
    whole = eager_estimate(estimator, model, batch, generator=torch.Generator()).grads
    summed = {k: torch.zeros_like(g) for k, g in whole.items()}
    unshared = {k: torch.zeros_like(g) for k, g in whole.items()}
    for part in shards(batch, 3):
        with cost_share(model, 1 / 3):
            for k, g in eager_estimate(estimator, model, part, generator=torch.Generator()).grads.items():
                summed[k] += g
        for k, g in eager_estimate(estimator, model, part, generator=torch.Generator()).grads.items():
            unshared[k] += g / 3
    for k in whole:
        scale = float(whole[k].abs().max())
        assert float((summed[k] - whole[k]).abs().max()) <= 1e-12 * scale, k
    if name in ("ep", "aep"):
        # Not a vacuous check: the mean of the shards' plain estimates is off by far more than rounding.
        assert max(float((unshared[k] - whole[k]).abs().max() / whole[k].abs().max()) for k in whole) > 1e-6


@pytest.mark.parametrize("name", ["dfa", "backprop"])
def test_a_feed_forward_estimate_is_the_mean_of_its_shards(name):
    problem = build_problem(load(), "resmlp", [name], model_settings={"dim": "16", "blocks": "2", "hidden": "16"},
                            data="sample", batch_size=32, seed=2, dtype="float64")
    model, batch, estimator = problem.model, problem.batch().batch, problem.estimators[name]
    init_state(estimator, model, seed=5)
    whole = eager_estimate(estimator, model, batch, generator=torch.Generator()).grads
    parts = [eager_estimate(estimator, model, part, generator=torch.Generator()).grads for part in shards(batch, 2)]
    for k in whole:
        assert torch.allclose((parts[0][k] + parts[1][k]) / 2, whole[k], rtol=0, atol=1e-12 * float(
            whole[k].abs().max())), k


def test_cost_share_scales_only_the_cost_and_restores_the_model():
    problem = build_problem(load(), "toy", [], batch_size=4, seed=0, dtype="float64")
    model, batch = problem.model, problem.batch().batch
    state = model.init_state(batch)
    plain_class, cost = type(model), float(model.cost(state, batch))
    with cost_share(model, 0.25):
        assert float(model.cost(state, batch)) == pytest.approx(0.25 * cost, rel=1e-15)
        assert isinstance(model, plain_class) and model.state_dict().keys() == {"W", "U", "b"}
    assert type(model) is plain_class and float(model.cost(state, batch)) == cost
    assert not hasattr(model, "epx_cost_share")
    resmlp = build_problem(load(), "resmlp", [], model_settings={"dim": "8", "blocks": "1", "hidden": "8"},
                           data="sample", batch_size=4).model
    feed_forward = type(resmlp)
    with cost_share(resmlp, 0.5):
        assert type(resmlp) is feed_forward, "a model without an equilibrium has its estimate weighted instead"


def test_shard_takes_the_ranks_rows_and_refuses_an_uneven_split():
    batch = {"inputs": torch.arange(12).reshape(6, 2), "targets": torch.arange(6)}
    assert shard(batch, ONE_PROCESS) is batch
    second = shard(batch, World(rank=1, size=3))
    assert second["inputs"].tolist() == [[4, 5], [6, 7]] and second["targets"].tolist() == [2, 3]
    with pytest.raises(ConfigError, match="divisible by 4"):
        shard(batch, World(rank=0, size=4))
    with pytest.raises(ConfigError, match="first"):
        shard({"inputs": torch.zeros(6, 2), "scale": torch.tensor(1.0)}, World(rank=0, size=2))


def test_each_rank_takes_its_own_gpu_and_one_process_keeps_the_device_given():
    assert ONE_PROCESS.place("cuda:1") == "cuda:1"
    assert World(rank=3, size=4, local_rank=1).place("cuda") == "cuda:1"
    assert World(rank=1, size=2).place("cpu") == "cpu"
    with pytest.raises(UsageError, match="give --device cuda"):
        World(rank=1, size=2).place("cuda:0")
    with pytest.raises(UsageError, match="cpu or cuda"):
        World(rank=1, size=2).place("mps")


def test_joined_is_one_process_without_a_launcher_and_names_what_a_launch_lacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with joined("cpu", timeout=5) as world:
        assert (world.rank, world.size, world.main, world.timeout) == (0, 1, True, 5)
        assert world.gather_json({"a": 1}, what="x") == [{"a": 1}]
        assert world.sum_numbers([1.5], what="x") == [1.5]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        with joined("cpu"):
            pass
    for timeout in (0, float("inf")):
        with pytest.raises(ConfigError, match="between 0 and"):
            with joined("cpu", timeout=timeout):
                pass


def test_under_torchrun_a_one_process_command_is_refused(monkeypatch):
    from click.testing import CliRunner

    from epx_cli.main import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(cli, ["compare", "ep", "--model", "toy"])
    assert result.exit_code == 2 and "`epx compare` runs in one process" in result.output
    assert CliRunner().invoke(cli, ["list"]).exit_code == 2


# --- two gloo processes ------------------------------------------------------------------------------------

SWEEP = ["sweep", "ep", "aep", "--model", "toy", "--model-set", "conservative=false", "--vary",
         "beta=0.01,0.02,0.04", "--seeds", "2", "--batch-size", "8"]


def test_a_two_process_sweep_writes_the_records_of_one_process(tmp_path):
    run(epx([*SWEEP, "--out", str(tmp_path / "one.json")]))
    two = run(torchrun([*SWEEP, "--out", str(tmp_path / "two.json")]))
    one_file, two_file = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert len(two_file["records"]) == 6 and without_timing(one_file) == without_timing(two_file)
    assert two.stdout.count("sweep of ") == 1, "only rank 0 prints the table"


def test_under_torchrun_only_rank_0_prints_and_the_others_name_themselves_in_their_errors():
    job = subprocess.run(torchrun(["train", "ep", "--model", "toy", "--steps", "2", "--batch-size", "7"]), env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert job.returncode != 0
    errors = sorted(line for line in job.stderr.splitlines() if line.startswith("error:"))
    assert len(errors) == 2 and "Traceback" not in "".join(errors)
    assert errors[0].startswith("error: batch_size: the global batch of 7 does not split into 2")
    assert errors[1].startswith("error: rank 1: batch_size: the global batch of 7")
    assert job.stdout == ""


TRAIN = ["train", "ep", "--model", "toy", "--model-set", "conservative=false", "--batch-size", "16", "--steps",
         "20", "--eval-every", "5", "--diagnose-every", "10", "--jacobian-penalty", "0.01", "--dtype", "float64",
         "--json"]


def test_two_process_training_ends_with_the_one_process_parameters(tmp_path):
    run(epx([*TRAIN, "--out", str(tmp_path / "one")]))
    run(torchrun([*TRAIN, "--out", str(tmp_path / "two")]))
    one, two = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("one", "two"))
    assert one["step"] == two["step"] == 20
    for name, tensor in one["model"].items():
        assert float((tensor - two["model"][name]).abs().max()) <= 1e-9, name
    logs = [[json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()]
            for n in ("one", "two")]
    assert [r["kind"] for r in logs[0]] == [r["kind"] for r in logs[1]]
    for a, b in zip(*logs):
        for key in ("loss", "val_loss", "jacobian", "residual"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-15), (a["step"], key)
        if "diagnostic" in a:
            assert b["diagnostic"]["cosine"] == pytest.approx(a["diagnostic"]["cosine"], abs=1e-12)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2


def test_two_process_dfa_training_keeps_the_feedback_and_matches_one_process(tmp_path):
    common = ["train", "dfa", "--model", "resmlp", "--model-set", "dim=16", "--model-set", "blocks=2",
              "--model-set", "hidden=16", "--data", "sample", "--batch-size", "32", "--steps", "8",
              "--eval-every", "4", "--diagnose-every", "4", "--dtype", "float64", "--json"]
    run(epx([*common, "--out", str(tmp_path / "one")]))
    run(torchrun([*common, "--out", str(tmp_path / "two")]))
    one, two = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("one", "two"))
    for name, tensor in one["model"].items():
        assert float((tensor - two["model"][name]).abs().max()) <= 1e-9, name
    for name, tensor in one["estimator"].items():
        assert torch.equal(tensor, two["estimator"][name]), name


def ranks_of(port: int, rank: int) -> list[int]:
    """PIDs of epx processes of the job on ``port`` with RANK=``rank`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if (f"MASTER_PORT={port}".encode() in environ and f"RANK={rank}".encode() in environ
                and b"epx_cli" in command and b"torch.distributed.run" not in command):
            pids.append(int(entry.name))
    return pids


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.02)


def records_in(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["records"])
    except (OSError, ValueError):
        return 0


LONG_SWEEP = ["sweep", "ep", "--model", "toy", "--vary", "beta=" + ",".join(f"0.0{i}" for i in range(1, 10)),
              "--repeats", "3"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_rank_killed_mid_sweep_stops_the_job_and_one_process_finishes_it_with_every_point_once(tmp_path):
    out, port = tmp_path / "s.json", free_port()
    job = subprocess.Popen(torchrun([*LONG_SWEEP, "--out", str(out)], port=port), env=ENV, text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: records_in(out) >= 2)
    [victim] = ranks_of(port, 1)
    os.kill(victim, signal.SIGKILL)
    stderr = job.communicate(timeout=90)[1]
    assert job.returncode != 0
    assert 2 <= records_in(out) < 9, "the kill must land mid-sweep for this test to mean anything"
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    # Rank 0 either sees the lost peer first or is ended by torchrun first: one line either way.
    assert ("rank 0 of 2" in line or "stopped by SIGTERM" in line) and f"finished points are in {out}" in line
    run(epx([*LONG_SWEEP, "--out", str(out)]))
    ids = [record["id"] for record in json.loads(out.read_text())["records"]]
    assert len(ids) == len(set(ids)) == 9
    run(epx([*LONG_SWEEP, "--out", str(tmp_path / "alone.json")]))
    assert without_timing(json.loads(out.read_text())) == without_timing(json.loads((tmp_path / "alone.json")
                                                                                    .read_text()))


def test_a_cancelled_sweep_records_no_point_as_failed_and_a_rerun_finishes_it(tmp_path):
    """SIGTERM to torchrun (scancel, a pod stopped) reaches every process: the point in flight is not this point's
    failure, so it is left out of --out rather than recorded as failed, and the rerun runs it."""
    out = tmp_path / "s.json"
    job = subprocess.Popen(torchrun([*LONG_SWEEP, "--out", str(out)]), env=ENV, text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: records_in(out) >= 2)
    job.send_signal(signal.SIGTERM)
    stderr = job.communicate(timeout=90)[1]
    assert job.returncode != 0 and "stopped by SIGTERM" in stderr
    kept = json.loads(out.read_text())["records"]
    assert 2 <= len(kept) < 9 and all(record["status"] == "ok" for record in kept)
    run(epx([*LONG_SWEEP, "--out", str(out)]))
    records = json.loads(out.read_text())["records"]
    assert len(records) == 9 and all(record["status"] == "ok" for record in records)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_rank_that_stops_answering_ends_the_job_after_the_timeout(tmp_path):
    """Two processes started by hand, as a launcher that only exports the variables would (no torchrun agent to
    kill the others): rank 1 frozen, rank 0 gives up after --dist-timeout with one error line."""
    out, port = tmp_path / "s.json", free_port()
    common = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen(epx([*LONG_SWEEP, "--dist-timeout", "3", "--out", str(out)]), text=True,
                              env={**common, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for r in range(2)]
    try:
        wait_for(lambda: records_in(out) >= 2)
        ranks[1].send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        stderr = ranks[0].communicate(timeout=60)[1]
        assert time.monotonic() - frozen < 30
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode == 1 and "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "did not answer within 3 s" in line
    assert json.loads(out.read_text())["records"], "the finished points were kept"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_two_process_training_killed_then_resumed_with_two_processes_ends_bitwise_identical(tmp_path):
    common = ["train", "aep", "--model", "toy", "--model-set", "conservative=false", "--batch-size", "8",
              "--steps", "40", "--checkpoint-every", "5", "--eval-every", "10", "--diagnose-every", "0"]
    run(torchrun([*common, "--out", str(tmp_path / "whole")]))
    killed, port = tmp_path / "killed", free_port()
    job = subprocess.Popen(torchrun([*common, "--out", str(killed)], port=port), env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "log.jsonl"
    wait_for(lambda: log.exists() and '"checkpoint", "step": 10' in log.read_text())
    for pid in ranks_of(port, 1):
        os.kill(pid, signal.SIGKILL)
    job.wait(timeout=90)
    stopped_at = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= stopped_at < 40, "the kill must land mid-run for this test to mean anything"
    run(torchrun([*common, "--resume", "--out", str(killed)]))
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert whole["step"] == resumed["step"] == 40
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
