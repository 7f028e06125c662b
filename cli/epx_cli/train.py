"""`epx train`: train a model with any registered estimator. Added through the ``register_commands`` hook, the way
a plugin adds a command."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ep_core.plugins import hookimpl
from ep_core.relax import CONVERGED_TOL
from ep_core.train import TrainConfig
from epx_cli.main import apply_options, check_device, err, handle_errors, model_data_options, out, registry, warn
from epx_cli.render import fmt_cosine, fmt_number

TRAIN_PREFIX = "train_"


def train_config_options() -> list[Callable[..., Any]]:
    """One option per TrainConfig field (``--eval-every`` for eval_every), validated by TrainConfig itself."""
    options = []
    for row in TrainConfig.describe():
        flag = "--" + row["name"].replace("_", "-")
        options.append(click.option(flag, TRAIN_PREFIX + row["name"], default=None, metavar=row["type"].upper(),
                                    help=f"{row['help']} (default {row['default']}; "
                                         f"valid: {row['range']})."))
    return options


def summary_table(records: list[dict[str, Any]], title: str) -> Table:
    """One row per validation: mean training loss since the previous one, validation loss, and the latest
    comparison with the reference gradient."""
    groups = next((list(r["diagnostic"]["groups"]) for r in records if "diagnostic" in r), [])
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in ("step", "train loss", "val loss", "lr", "residual", "cos all", *(f"cos {g}" for g in groups)):
        table.add_column(column, justify="right")
    losses: list[float] = []
    latest: dict[str, Any] = {}
    for record in records:
        if record["kind"] == "train":
            latest["train"] = record
            if "diagnostic" in record:
                latest["diagnostic"] = record["diagnostic"]
            if record.get("loss") is not None:
                losses.append(record["loss"])
        elif record["kind"] == "eval":
            train = latest.get("train", {})
            diagnostic = latest.get("diagnostic")
            table.add_row(
                str(record["step"]),
                fmt_number(sum(losses) / len(losses) if losses else None, ".4f"),
                fmt_number(record["val_loss"], ".4f"),
                fmt_number(train.get("lr"), ".2e"),
                fmt_number(train.get("residual"), ".1e"),
                fmt_cosine(diagnostic["cosine"] if diagnostic else None),
                *(fmt_cosine(diagnostic["groups"].get(g) if diagnostic else None) for g in groups),
            )
            losses = []
    return table


def _status(record: dict[str, Any], shown: dict[str, str]) -> str:
    if record["kind"] == "train":
        if record.get("loss") is not None:
            shown["loss"] = f"loss {record['loss']:.4f}"
        if "diagnostic" in record and record["diagnostic"]["cosine"] is not None:
            shown["cos"] = f"cos {record['diagnostic']['cosine']:.4f}"
    elif record["kind"] == "eval":
        shown["val"] = f"val {record['val_loss']:.4f}"
    return " · ".join(shown[k] for k in ("loss", "val", "cos") if k in shown)


@click.command()
@click.argument("estimator")
@apply_options([
    click.option("--ref", "reference", default="bptt", show_default=True,
                 help="Estimator whose gradient the trained one is compared with every --diagnose-every steps "
                      "(use --diagnose-every 0 to skip)."),
    click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                 help="Option of the estimator being trained, e.g. beta=0.01, clip=1."),
    *model_data_options(),
    *train_config_options(),
    click.option("--out", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Run directory for run.json, log.jsonl and checkpoint.pt (checkpoints need it)."),
    click.option("--resume", is_flag=True,
                 help="Continue the run in --out from its last checkpoint; the other options must be the same."),
    click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Write a PNG of the training and validation loss and of the cosine to the reference (needs "
                      "the 'plot' extra: pip install 'epx[plot]')."),
    click.option("--json", "as_json", is_flag=True, help="Print every log record as JSON on stdout, not a table."),
])
@handle_errors
def train(estimator: str, reference: str, settings: tuple[str, ...], model_name: str,
          model_settings: tuple[str, ...], data: str, data_dir: str | None, no_download: bool,
          batch_size: int | None, seed: int, device: str, dtype: str, directory: Path | None, resume: bool,
          plot_file: Path | None, as_json: bool, **train_options: str | None) -> None:
    """Train a model with ESTIMATOR's gradient: AdamW, warm-up and cosine schedule, clipping per parameter
    group, validation loss, and every few steps the cosine of ESTIMATOR's gradient to the exact one.

    \b
    epx train aep --model lm --out runs/lm-aep
    epx train aep --model lm --out runs/lm-aep --resume        continue after a stop or a crash
    epx train ep --model cet --steps 100 --lr 1e-3 --plot cet.png
    """
    from ep_core.session import parse_settings
    from ep_core.train import Progress as TrainProgress
    from ep_core.train import build_run
    from ep_core.train import train as run_training

    if plot_file is not None:
        from epx_cli.plot import require_matplotlib

        require_matplotlib()
    if resume and directory is None:
        raise click.UsageError("--resume needs --out DIR, the run directory to continue")
    check_device(device)
    train_settings = {k.removeprefix(TRAIN_PREFIX): v for k, v in train_options.items() if v is not None}
    run = build_run(registry(), estimator, model_name, settings=parse_settings(settings, "--set"),
                    model_settings=parse_settings(model_settings, "--model-set"), train_settings=train_settings,
                    data=data, data_dir=data_dir, download=not no_download, warn=warn, batch_size=batch_size,
                    seed=seed, dtype=dtype, device=device, reference=reference)
    steps = run.config.steps
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    shown: dict[str, str] = {}
    warned_unconverged = False
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"{estimator} on {model_name}", total=steps, status="")
        progress = TrainProgress()

        def on_record(record: dict[str, Any]) -> None:
            nonlocal warned_unconverged
            bar.update(task, completed=record["step"], status=_status(record, shown))
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
            records = run_training(run, directory=directory, resume=resume, progress=progress)
        finally:
            signal.signal(signal.SIGINT, previous)
    if directory is not None:
        err.print(f"run directory: {escape(str(directory))} (run.json, log.jsonl, checkpoint.pt)", highlight=False)
    if plot_file is not None:
        from epx_cli.plot import plot_training

        plot_training({estimator: records}, plot_file, title=f"{estimator} on {model_name}")
        err.print(f"wrote {escape(str(plot_file))}", highlight=False)
    if as_json:
        for record in records:
            click.echo(json.dumps(record, allow_nan=False))
        return
    out.print(summary_table(records, f"{estimator} training {model_name} · {steps} steps · data "
                                     f"{run.spec['data']['name']} · batch {run.batch_size} · seed {seed}"))


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(train)
