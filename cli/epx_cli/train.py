"""`epx train`: train a model with any registered estimator. Added through the ``register_commands`` hook, the way
a plugin adds a command."""

from __future__ import annotations

import json
import shlex
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ep_core.errors import Interrupted, ResumeError
from ep_core.plugins import hookimpl
from ep_core.schedule import TrainConfig
from epx_cli.main import (OutputPath, apply_options, check_device, dist_timeout_option, eager_option, err,
                          model_data_options, out, processes, registry, use_torch, warn, wide_option, write_output)
from epx_cli.render import training_report

TRAIN_PREFIX = "train_"


def train_config_options() -> list[Callable[..., Any]]:
    """One option per TrainConfig field (``--eval-every`` for eval_every), validated by TrainConfig itself."""
    options = []
    for row in TrainConfig.describe():
        flag = "--" + row["name"].replace("_", "-")
        default = "scaled to --steps" if row["default"] is None else row["default"]
        options.append(click.option(flag, TRAIN_PREFIX + row["name"], default=None, metavar=row["type"].upper(),
                                    help=f"{row['help']} (default {default}; valid: {row['range']})."))
    return options


def _status(record: dict[str, Any], shown: dict[str, str]) -> str:
    if record["kind"] == "train":
        if record.get("loss") is not None:
            shown["loss"] = f"loss {record['loss']:.4f}"
        if "diagnostic" in record and record["diagnostic"]["cosine"] is not None:
            shown["cos"] = f"cos {record['diagnostic']['cosine']:.4f}"
    elif record["kind"] == "eval":
        shown["val"] = f"val {record['val_loss']:.4f}"
    elif record["kind"] == "epoch" and record.get("test_accuracy") is not None:
        shown["acc"] = f"test acc {record['test_accuracy']:.4f}"
    return " · ".join(shown[k] for k in ("loss", "val", "acc", "cos") if k in shown)


def resume_conflicts(ctx: click.Context, recorded: dict[str, Any]) -> list[str]:
    """One line per option given on the command line whose value differs from the run being resumed."""
    from ep_core.schedule import TrainConfig
    from ep_core.session import parse_settings, split_estimator_settings

    given = {name: value for name, value in ctx.params.items()
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    conflicts = []

    def differ(option: str, then: Any, now: Any) -> None:
        if then != now:
            conflicts.append(f"{option}: {then!r} in run.json, {now!r} given")

    name = recorded["estimator"]["name"]
    for key, option, then in (("estimator", "ESTIMATOR", name), ("model_name", "--model", recorded["model"]["name"]),
                              ("data", "--data", recorded["data"]["requested"]),
                              ("batch_size", "--batch-size", recorded["batch_size"]),
                              ("seed", "--seed", recorded["seed"]), ("dtype", "--dtype", recorded["dtype"]),
                              ("device", "--device", recorded["device"])):
        if key in given:
            differ(option, then, given[key])
    if "reference" in given:
        differ("--ref", recorded["reference"], None if given["reference"] == name else given["reference"])
    reg = registry()
    if "settings" in given:
        cls = reg.get("estimator", name).factory
        then = recorded["estimator"]["config"]
        routed = split_estimator_settings(parse_settings(given["settings"], "--set"), {name: cls})[name]
        now = cls.Config.from_mapping({**then, **routed}).to_dict()
        for key in routed:
            differ(f"--set {key}", then.get(key), now[key])
    if "model_settings" in given:
        cls = reg.get("model", recorded["model"]["name"]).factory
        then = recorded["model"]["config"]
        changed = parse_settings(given["model_settings"], "--model-set")
        now = cls.Config.from_mapping({**then, **changed}).to_dict()
        for key in changed:
            differ(f"--model-set {key}", then.get(key), now[key])
    changed = {k.removeprefix(TRAIN_PREFIX): v for k, v in given.items() if k.startswith(TRAIN_PREFIX)}
    if changed:
        now = TrainConfig.from_mapping({**recorded["train"], **changed}).resolved().to_dict()
        for key in changed:
            differ("--" + key.replace("_", "-"), recorded["train"].get(key), now[key])
    return conflicts


def recorded_options(recorded: dict[str, Any]) -> dict[str, Any]:
    """The arguments of :func:`ep_core.train.build_run` that rebuild a recorded run."""
    return {"estimator": recorded["estimator"]["name"], "model": recorded["model"]["name"],
            "settings": recorded["estimator"]["config"], "model_settings": recorded["model"]["config"],
            "train_settings": recorded["train"], "data": recorded["data"]["requested"],
            "batch_size": recorded["batch_size"], "seed": recorded["seed"], "dtype": recorded["dtype"],
            "device": recorded["device"], "reference": recorded["reference"]}


@click.command()
@click.argument("estimator", required=False)
@apply_options([
    click.option("--ref", "reference", default="bptt", show_default=True,
                 help="Estimator whose gradient the trained one is compared with every --diagnose-every steps "
                      "(use --diagnose-every 0 to skip)."),
    click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                 help="Option of the estimator being trained, e.g. beta=0.01, clip=1."),
    *model_data_options(model_required=False),
    *train_config_options(),
    click.option("--out", "directory", type=OutputPath(directory=True), default=None,
                 help="Run directory for run.json, log.jsonl and checkpoint.pt (checkpoints need it)."),
    click.option("--resume", is_flag=True,
                 help="Continue the run in --out from its last checkpoint, with the options recorded in its "
                      "run.json (`epx train --resume --out DIR` is enough; an option given must match)."),
    click.option("--plot", "plot_file", type=OutputPath(), default=None,
                 help="Write a PNG of the training and validation loss and of the cosine to the reference (needs "
                      "the 'plot' extra: pip install 'epx[plot]')."),
    click.option("--json", "as_json", is_flag=True, help="Print every log record as JSON on stdout, not a table."),
    eager_option,
    dist_timeout_option,
    wide_option,
])
@click.pass_context
def train(ctx: click.Context, estimator: str | None, reference: str, settings: tuple[str, ...],
          model_name: str | None, model_settings: tuple[str, ...], data: str, data_dir: str | None,
          no_download: bool, batch_size: int | None, seed: int, device: str, dtype: str, directory: Path | None,
          resume: bool, plot_file: Path | None, as_json: bool, eager: bool, dist_timeout: float | None, wide: bool,
          **train_options: str | None) -> None:
    """Train a model with ESTIMATOR's gradient: AdamW, warm-up and cosine schedule, clipping per parameter
    group, validation loss, and every few steps the cosine of ESTIMATOR's gradient to the exact one.

    \b
    epx train aep --model lm --out runs/lm-aep
    epx train --resume --out runs/lm-aep          continue after Ctrl-C or a crash, with the recorded options
    epx train ep --model cet --steps 100 --lr 1e-3 --plot cet.png
    torchrun --nproc-per-node 2 -m epx_cli train ep --model lm --device cuda --batch-size 64 --out runs/lm-ep

    Under torchrun, training is data-parallel: --batch-size is the global batch, split evenly among the processes,
    whose gradients are summed before every step; rank 0 writes --out (docs/distributed.md).
    """
    from ep_core.session import parse_settings
    from ep_core.train import LOG_FILE, build_run, checkpoint_step, read_log, read_run

    use_torch()
    if plot_file is not None:
        from epx_cli.plot import require_matplotlib

        require_matplotlib()
    if resume:
        if directory is None:
            raise click.UsageError("--resume needs --out DIR, the run directory to continue", ctx)
        recorded = read_run(directory)
        conflicts = resume_conflicts(ctx, recorded)
        if conflicts:
            raise ResumeError(f"--resume: options differ from the run in {directory}: {'; '.join(conflicts)}. Run "
                              f"`epx train --resume --out {shlex.quote(str(directory))}` alone to continue with "
                              "the recorded options")
        done, steps = checkpoint_step(directory), recorded["train"]["steps"]
        estimator, model_name = recorded["estimator"]["name"], recorded["model"]["name"]
        if done >= steps:
            err.print(f"the run in {escape(str(directory))} is complete: {done} of {steps} steps, nothing to do. "
                      "A finished run cannot be extended (its learning-rate schedule depends on --steps): to train "
                      "longer, start a new run with a larger --steps and another --out.", highlight=False)
            show_records(read_log(directory / LOG_FILE), recorded, as_json=as_json, wide=wide)
            return
        options = recorded_options(recorded)
    else:
        if estimator is None:
            raise click.UsageError("Missing argument 'ESTIMATOR' (or give --resume --out DIR)", ctx)
        if model_name is None:
            raise click.UsageError("Missing option '--model' / '-m'", ctx)
        check_device(device)
        options = {"estimator": estimator, "model": model_name, "settings": parse_settings(settings, "--set"),
                   "model_settings": parse_settings(model_settings, "--model-set"),
                   "train_settings": {k.removeprefix(TRAIN_PREFIX): v for k, v in train_options.items()
                                      if v is not None},
                   "data": data, "batch_size": batch_size, "seed": seed, "dtype": dtype, "device": device,
                   "reference": reference}
    with processes(options["device"], dist_timeout) as world:
        run = build_run(registry(), **options, data_dir=data_dir, download=not no_download, warn=warn, world=world)
        records = _train(run, estimator=estimator, model_name=model_name, directory=directory, resume=resume,
                         eager=eager, world=world)
    if not world.main:
        return
    if directory is not None:
        err.print(f"run directory: {escape(str(directory))} (run.json, log.jsonl, checkpoint.pt)", highlight=False)
    if plot_file is not None:
        from epx_cli.plot import plot_training

        write_output(plot_file, lambda path: plot_training({estimator: records}, path,
                                                           title=f"{estimator} on {model_name}"))
    show_records(records, run.spec, as_json=as_json, wide=wide)


def _train(run: Any, *, estimator: str, model_name: str, directory: Path | None, resume: bool, eager: bool,
           world: Any) -> list[dict[str, Any]]:
    """Run the training loop behind a progress bar; Ctrl-C stops after the current step, twice at once."""
    from ep_core.relax import CONVERGED_TOL
    from ep_core.train import CHECKPOINT_FILE, Stopped
    from ep_core.train import Progress as TrainProgress
    from ep_core.train import train as run_training

    steps = run.config.steps
    resume_command = None if directory is None else f"epx train --resume --out {shlex.quote(str(directory))}"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    shown: dict[str, str] = {}
    warned_unconverged = False
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"{estimator} on {model_name}", total=steps, status="")
        progress = TrainProgress()

        def on_record(record: dict[str, Any]) -> None:
            nonlocal warned_unconverged
            status = _status(record, shown)
            bar.update(task, completed=record["step"], status=status)
            if record["kind"] == "eval" and not err.is_terminal:
                err.print(f"step {record['step']}/{steps} · {status}", highlight=False)
            if record["kind"] == "epoch" and not err.is_terminal:
                err.print(f"epoch {record['epoch']} (step {record['step']}/{steps}) · {status}", highlight=False)
            residual = record.get("residual")
            if residual is not None and residual > CONVERGED_TOL and not warned_unconverged:
                warned_unconverged = True
                warn(f"step {record['step']}: the free phase no longer converges (residual {residual:.1e} > "
                     f"{CONVERGED_TOL:g}); the estimators' fixed-point assumption fails from here on. If the "
                     "residual keeps rising, training is pushing the model out of its stable regime: lower --lr")

        progress.on_record = on_record

        def stop_after_step(signum: int, frame: Any) -> None:
            err.print("stopping after this step (press Ctrl-C again to stop at once)")
            progress.stop.set()
            signal.signal(signal.SIGINT, previous)

        previous = signal.signal(signal.SIGINT, stop_after_step)
        try:
            records = run_training(run, directory=directory, resume=resume, progress=progress, eager=eager,
                                   world=world)
        except Stopped as stopped:
            if directory is None:
                raise Interrupted(f"after step {stopped.step}; nothing was saved (train with --out DIR to be able "
                                  "to resume)") from None
            raise Interrupted(f"after step {stopped.step}; its checkpoint is in {directory}",
                              resume=resume_command) from None
        except KeyboardInterrupt:
            kept = directory is not None and (directory / CHECKPOINT_FILE).exists()
            raise Interrupted("at once, in the middle of a step" + (
                f"; the run continues from the last checkpoint in {directory}" if kept else "; nothing was saved"),
                resume=resume_command if kept else None) from None
        finally:
            signal.signal(signal.SIGINT, previous)
    return records


def show_records(records: list[dict[str, Any]], spec: dict[str, Any], *, as_json: bool, wide: bool) -> None:
    """A run's log on stdout: JSON lines, or the summary table."""
    from ep_core.relax import CONVERGED_TOL

    if as_json:
        for record in records:
            click.echo(json.dumps(record, allow_nan=False))
        return
    estimator, model_name, steps = spec["estimator"]["name"], spec["model"]["name"], spec["train"]["steps"]
    title = (f"{estimator} training {model_name} · {steps} steps · data {spec['data']['name']} · batch "
             f"{spec['batch_size']} · seed {spec['seed']}")
    with out.natural_width(wide):
        out.print(Group(*training_report(records, title, CONVERGED_TOL)))


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(train)
