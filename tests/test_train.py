"""`epx train` and ep_core.train: schedule, clipping, losses that fall, exact resume (in-process and after
SIGKILL), and the run directory's rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ep_core.config import ConfigError
from ep_core.plugins import load
from ep_core.protocols import EpxError
from ep_core.train import CHECKPOINT_FILE, LOG_FILE, Interrupted, Progress, TrainConfig, build_run, clip_groups
from ep_core.train import learning_rate, train

TOY = {"units": "6", "inputs": "3", "outputs": "2", "T1": "60", "conservative": "false"}
TOY_TRAIN = {"steps": "6", "eval_every": "2", "diagnose_every": "3", "checkpoint_every": "2", "lr": "0.05",
             "warmup": "2"}


def toy_run(**train_settings: str):
    return build_run(load(), "aep", "toy", model_settings=TOY, train_settings={**TOY_TRAIN, **train_settings},
                     batch_size=8, seed=3)


def parameters(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "ms"} for r in records]


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    config = TrainConfig(steps=100, lr=1e-2, warmup=10, min_lr=0.1)
    rates = [learning_rate(config, t) for t in range(1, 101)]
    assert rates[:10] == pytest.approx([1e-3 * t for t in range(1, 11)])
    assert rates[9] == pytest.approx(1e-2)
    assert rates[-1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    middle = config.warmup + (config.steps - config.warmup) // 2
    assert learning_rate(config, middle) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))


def test_clipping_is_per_parameter_group():
    run = toy_run()
    params = dict(run.model.named_parameters())
    params["W"].grad = torch.full_like(params["W"], 10.0)  # group "coupling", norm 60
    params["U"].grad = torch.full_like(params["U"], 0.01)  # group "input" with b: far below the limit
    params["b"].grad = torch.zeros_like(params["b"])
    norms = clip_groups(run.model, 2.0)
    assert norms["coupling"] == pytest.approx(60.0, rel=1e-6)
    assert float(params["W"].grad.norm()) == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(params["U"].grad, torch.full_like(params["U"], 0.01))


def test_training_lowers_the_validation_loss_and_logs_diagnostics():
    records = train(toy_run(steps="30", eval_every="10", diagnose_every="10"))
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 10, 20, 30]
    assert evals[-1] < 0.8 * evals[0]
    diagnostics = [r["diagnostic"] for r in records if "diagnostic" in r]
    assert len(diagnostics) == 3
    assert all(d["cosine"] > 0.99 for d in diagnostics)  # aep on a converged stable toy is nearly exact


def test_resume_after_a_stop_is_bitwise_identical(tmp_path):
    whole = toy_run()
    whole_records = train(whole, directory=tmp_path / "whole")

    stopped = toy_run()
    progress = Progress()
    progress.on_record = lambda record: record["step"] == 3 and progress.stop.set()
    with pytest.raises(Interrupted, match="after step 3"):
        train(stopped, directory=tmp_path / "parts", progress=progress)
    resumed = toy_run()
    resumed_records = train(resumed, directory=tmp_path / "parts", resume=True)

    for name, tensor in parameters(whole).items():
        assert torch.equal(tensor, parameters(resumed)[name]), name
    # The stopped run checkpointed after step 3; from there on the log is the uninterrupted run's.
    through_step_3 = [r for r in whole_records if r["step"] <= 3]
    expected = through_step_3 + [{"kind": "checkpoint", "step": 3}] + [r for r in whole_records if r["step"] > 3]
    assert without_timing(resumed_records) == without_timing(expected)
    logged = [json.loads(line) for line in (tmp_path / "parts" / LOG_FILE).read_text().splitlines()]
    assert without_timing(logged) == without_timing(resumed_records)


def test_a_run_directory_is_not_overwritten_and_resume_checks_the_options(tmp_path):
    train(toy_run(steps="2"), directory=tmp_path)
    with pytest.raises(EpxError, match="already holds a run; pass --resume"):
        train(toy_run(steps="2"), directory=tmp_path)
    with pytest.raises(EpxError, match="written by a different run .train.lr: 0.05 there, 0.01 now"):
        train(toy_run(steps="2", lr="0.01"), directory=tmp_path, resume=True)
    with pytest.raises(EpxError, match="nothing to resume"):
        train(toy_run(), directory=tmp_path / "empty", resume=True)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(EpxError, match="not a readable epx checkpoint"):
        train(toy_run(steps="2"), directory=tmp_path, resume=True)


def test_settings_are_validated_before_any_data_is_loaded():
    with pytest.raises(ConfigError, match="lr"):
        build_run(load(), "aep", "cet", train_settings={"lr": "-1"})
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        build_run(load(), "aep", "cet", train_settings={"stesp": "3"})


def test_train_is_generic_masked_reconstruction_on_cet_falls():
    """The same loop trains cet, a model with images and a masked-pixel cost."""
    small = {"dim": "16", "heads": "2", "head_dim": "8", "memories": "16", "T1": "30", "s": "0.5"}
    run = build_run(load(), "aep", "cet", model_settings=small, data="sample", batch_size=16,
                    train_settings={"steps": "40", "eval_every": "20", "diagnose_every": "0", "lr": "0.01",
                                    "warmup": "5"})
    evals = [r["val_loss"] for r in train(run) if r["kind"] == "eval"]
    assert evals[-1] < 0.8 * evals[0], evals


def kill_then_resume(common: list[str], tmp_path, resume: list[str]) -> tuple[dict, dict]:
    """Train ``epx COMMON`` to the end in one directory; in another, SIGKILL it after its step-10 checkpoint and
    run ``epx RESUME --out DIR``; return both final checkpoints (the log of the killed run is checked too)."""
    env = {**os.environ, "EPX_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "epx_cli", *common, "--out", str(tmp_path / "whole")], check=True,
                   env=env, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "epx_cli", *common, "--out", str(killed)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / LOG_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and '"checkpoint", "step": 10' in log.read_text()):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = torch.load(killed / CHECKPOINT_FILE, weights_only=True)["step"]
    assert 10 <= stopped_at < 40, "the kill must land mid-run for this test to mean anything"
    subprocess.run([sys.executable, "-m", "epx_cli", *resume, "--out", str(killed)], check=True, env=env,
                   capture_output=True)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 40
    whole = torch.load(tmp_path / "whole" / CHECKPOINT_FILE, weights_only=True)
    resumed = torch.load(killed / CHECKPOINT_FILE, weights_only=True)
    assert whole["step"] == resumed["step"] == 40
    return whole, resumed


def test_sigkill_then_resume_ends_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    common = ["train", "aep", "--model", "toy", "--model-set", "conservative=false", "--batch-size", "8",
              "--steps", "40", "--checkpoint-every", "5", "--eval-every", "10", "--diagnose-every", "0"]
    whole, resumed = kill_then_resume(common, tmp_path, [*common, "--resume"])
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_ctrl_c_then_the_printed_resume_command_ends_bitwise_identical_to_an_uninterrupted_run(tmp_path,
                                                                                                 interrupt_epx):
    common = ["train", "aep", "--model", "toy", "--model-set", "conservative=false", "--batch-size", "8",
              "--steps", "40", "--checkpoint-every", "5", "--eval-every", "10", "--diagnose-every", "0"]
    env = {**os.environ, "EPX_THREADS": "1"}
    epx = [sys.executable, "-m", "epx_cli"]
    subprocess.run([*epx, *common, "--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)

    stopped = tmp_path / "stopped dir"  # a space: the printed command must quote it
    log = stopped / LOG_FILE
    command = interrupt_epx([*common, "--out", str(stopped)], lambda: log.exists() and '"step": 10' in log.read_text())
    assert command == ["epx", "train", "--resume", "--out", str(stopped)]
    stopped_at = torch.load(stopped / CHECKPOINT_FILE, weights_only=True)["step"]
    assert 10 <= stopped_at < 40, "the stop must land mid-run for this test to mean anything"

    resumed_run = subprocess.run([*epx, *command[1:]], env=env, capture_output=True, text=True)
    assert resumed_run.returncode == 0, resumed_run.stderr
    whole = torch.load(tmp_path / "whole" / CHECKPOINT_FILE, weights_only=True)
    resumed = torch.load(stopped / CHECKPOINT_FILE, weights_only=True)
    assert whole["step"] == resumed["step"] == 40
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name

    again = subprocess.run([*epx, *command[1:]], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "is complete: 40 of 40 steps" in " ".join(again.stderr.split())
    assert "val loss" in again.stdout or "val" in again.stdout


def test_train_command_prints_the_table_and_is_registered_through_the_hook(tmp_path):
    import click
    from click.testing import CliRunner

    from epx_cli.main import cli

    result = CliRunner().invoke(cli, ["train", "aep", "--model", "toy", "--steps", "4", "--eval-every", "2",
                                      "--diagnose-every", "2", "--plot", str(tmp_path / "curve.png")])
    assert result.exit_code == 0, result.output
    assert "val loss" in result.output and "cos coupling" in result.output
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    fresh, group = load(), click.Group()
    fresh.add_commands(group)
    assert "train" in group.commands
    plugin = fresh.plugin("train")
    assert plugin.registered == ["command:train"] and plugin.distribution == "epx"
    bad = CliRunner().invoke(cli, ["train", "aep", "--model", "toy", "--lr", "0"])
    assert bad.exit_code == 2 and "lr: 0.0 is out of range" in bad.output


RESMLP = {"dim": "16", "blocks": "2", "hidden": "16"}


def test_epochs_log_accuracy_on_the_whole_held_out_set_and_the_residual_stream():
    run = build_run(load(), "dfa", "resmlp", model_settings=RESMLP, data="sample", batch_size=512,
                    settings={"lam": "0.01"}, train_settings={"epochs": "2", "diagnose_every": "0"})
    assert run.steps_per_epoch == 4 and run.config.steps == 8  # the generated sample holds 2048 images
    assert (run.config.lr, run.config.warmup, run.config.min_lr) == (1e-3, 0, 0.0)  # resmlp's own defaults
    epochs = [r for r in train(run) if r["kind"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 4), (2, 8)]
    for record in epochs:
        assert 0.0 <= record["test_accuracy"] <= 1.0
        assert set(record["stream"]) >= {"h_L_norm", "grad_norm", "growth", "max_growth", "accuracy"}
    whole = run.held_out
    accuracy = run.model.metrics(run.model.prepare_batch(whole.images.float() / 255, whole.labels,
                                                         generator=torch.Generator()))["accuracy"]
    assert epochs[-1]["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    with pytest.raises(ConfigError, match="not both"):
        build_run(load(), "dfa", "resmlp", model_settings=RESMLP, data="sample",
                  train_settings={"epochs": "2", "steps": "5"})
    with pytest.raises(ConfigError, match="needs a model that learns from a dataset"):
        toy_run(steps=None, epochs="2")


def test_frozen_groups_stay_as_initialised():
    run = build_run(load(), "backprop", "resmlp", model_settings=RESMLP, data="sample", batch_size=32,
                    train_settings={"steps": "3", "freeze": "block*", "diagnose_every": "0"})
    before = parameters(run)
    train(run)
    after = parameters(run)
    frozen = {name for name in before if name.startswith("blocks.")}
    assert frozen and run.frozen == frozen
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    with pytest.raises(ConfigError, match="'bloc' matches no parameter group; the groups are embed, block0"):
        build_run(load(), "backprop", "resmlp", model_settings=RESMLP, data="sample",
                  train_settings={"freeze": "bloc"})


def test_sigkill_during_dfa_training_then_resume_restores_parameters_and_feedback_bitwise(tmp_path):
    common = ["train", "dfa", "--model", "resmlp", "--data", "sample", "--model-set", "dim=16", "--model-set",
              "blocks=2", "--batch-size", "16", "--set", "lam=0.01", "--steps", "40", "--checkpoint-every", "5",
              "--eval-every", "10", "--diagnose-every", "0"]
    whole, resumed = kill_then_resume(common, tmp_path, ["train", "--resume"])
    assert set(whole["estimator"]) == {"B0", "B1"}
    for part in ("model", "estimator"):
        for name, tensor in whole[part].items():
            assert torch.equal(tensor, resumed[part][name]), (part, name)


def test_sigkill_during_fa_training_then_resume_restores_parameters_and_feedback_bitwise(tmp_path):
    common = ["train", "fa", "--model", "localgpt", "--data", "sample", "--model-set", "layers=1", "--model-set",
              "width=16", "--model-set", "context=16", "--batch-size", "8", "--set", "ln=center_scale", "--steps",
              "40", "--checkpoint-every", "5", "--eval-every", "10", "--diagnose-every", "0"]
    whole, resumed = kill_then_resume(common, tmp_path, ["train", "--resume"])
    assert "lm_head" in whole["estimator"] and "blocks.0.attn.c_attn" in whole["estimator"]
    for part in ("model", "estimator"):
        for name, tensor in whole[part].items():
            assert torch.equal(tensor, resumed[part][name]), (part, name)


def test_augmentation_is_seeded_and_changes_the_training_batches():
    def final(augment: str) -> dict[str, torch.Tensor]:
        run = build_run(load(), "backprop", "resmlp", model_settings=RESMLP, data="sample", batch_size=32,
                        train_settings={"steps": "3", "diagnose_every": "0", "augment": augment})
        train(run)
        return parameters(run)

    plain, augmented, again = final("false"), final("true"), final("true")
    assert all(torch.equal(augmented[k], again[k]) for k in plain)
    assert not torch.equal(plain["embedding.weight"], augmented["embedding.weight"])
