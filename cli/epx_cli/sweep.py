"""`epx sweep`: a grid of comparisons, as a table, a resumable JSON file and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ep_core.config import ConfigError
from ep_core.errors import DistributedError, Interrupted
from ep_core.files import check_output
from epx_cli.main import (OutputPath, check_names, comparison_options, dist_timeout_option, err, invocation, out,
                          processes, warn, wide_option, write_output)
from epx_cli.render import sweep_report


@click.command()
@comparison_options(repeats=1)
@click.option("--vary", "varies", multiple=True, required=True, metavar="KEY=V1,V2,...",
              help="A knob and its values; repeat for a grid. KEY is a model option (s, T1, eps, ...) or an "
                   "estimator option (beta, T2, clip, Tadj, ...); model.KEY or aep.KEY name the owner.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Run every point with seeds --seed, --seed+1, ...; the table shows mean ± std.")
@click.option("--group", default=None, help="Also show the cosine of this parameter group (e.g. attention).")
@click.option("--out", "out_file", type=OutputPath(), default=None,
              help="JSON file, one record per point, rewritten atomically after each; rerunning the same "
                   "sweep with the same file skips the points already in it.")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep as JSON on stdout instead of a table.")
@click.option("--plot", "plot_file", type=OutputPath(), default=None,
              help="Write a PNG: cosine against the first varied knob, one line per estimator (needs the "
                   "'plot' extra: pip install 'epx[plot]').")
@click.option("--panel", type=click.Choice(["ms", "residual"]), default="ms", show_default=True,
              help="What the plot's second panel shows.")
@dist_timeout_option
@wide_option
def sweep(estimators: tuple[str, ...], model_name: str, reference: str, settings: tuple[str, ...],
          model_settings: tuple[str, ...], data: str, data_dir: str | None, no_download: bool, batch_size: int,
          seed: int, device: str, dtype: str, repeats: int, eager: bool, varies: tuple[str, ...], seeds: int,
          group: str | None, out_file: Path | None, as_json: bool, plot_file: Path | None, panel: str,
          dist_timeout: float | None, wide: bool) -> None:
    """Compare ESTIMATORS against the reference at every point of a grid of knob values.

    \b
    epx sweep ep aep --model cet --vary s=0.25,0.5,1,2,4,8 --group attention --out s.json --plot s.png
    epx sweep ep aep --model cet --model-set s=2 --vary beta=0.005,0.01,0.02 --seeds 3
    torchrun --nproc-per-node 4 -m epx_cli sweep ep aep --model cet --vary s=0.5,1,2,4 --device cuda --out s.json

    Under torchrun the grid points are shared out among the processes (one GPU each with --device cuda); rank 0
    writes --out after every round, and a rerun with any number of processes resumes (docs/distributed.md).
    """
    from ep_core.session import build_model, parse_settings
    from ep_core.sweep import SweepSpec, run_sweep, summarize

    if plot_file is not None:
        from epx_cli.plot import require_matplotlib

        require_matplotlib()
    reg = check_names(estimators, model_name, reference, device)
    parsed_model_settings = parse_settings(model_settings, "--model-set")
    if group is not None:
        groups = build_model(reg, model_name, parsed_model_settings).parameter_groups()
        if group not in groups:
            raise ConfigError("group", f"{model_name} has no parameter group {group!r}; "
                                       f"valid: {', '.join(groups)}")
    spec = SweepSpec(estimators=estimators, model=model_name, reference=reference,
                     settings=parse_settings(settings, "--set"), model_settings=parsed_model_settings,
                     vary=varies, seeds=tuple(range(seed, seed + seeds)), data=data, batch_size=batch_size,
                     dtype=dtype, device=device, repeats=repeats)
    created = [] if out_file is None else check_output(out_file, option="--out")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("sweep", total=None)

        started = time.perf_counter()

        def on_point(index: int, total: int, point: Any) -> None:
            nonlocal started
            values = ", ".join(f"{k}={v}" for k, v in point.values.items())
            bar.update(task, total=total, completed=index, description=f"{values} seed {point.seed}")
            started = time.perf_counter()

        def on_record(index: int, total: int, record: dict[str, Any], resumed: bool) -> None:
            if err.is_terminal:
                return
            values = ", ".join(f"{k}={v}" for k, v in record["values"].items())
            outcome = ("already in --out" if resumed else f"{record['status']} in {time.perf_counter() - started:.1f} s"
                       + (f": {record['error']}" if record["status"] == "failed" else ""))
            err.print(f"sweep [{index + 1}/{total}] {escape(values)} seed {record['seed']}: {escape(outcome)}",
                      highlight=False)

        try:
            with processes(device, dist_timeout) as world:
                try:
                    result = run_sweep(reg, spec, out=out_file, data_dir=data_dir, download=not no_download,
                                       warn=warn, on_point=on_point, on_record=on_record, eager=eager, world=world)
                except DistributedError as exc:
                    if out_file is None:
                        raise
                    raise DistributedError(f"{exc}. The finished points are in {out_file}; the same command, with "
                                           "any number of processes, runs only the rest") from None
        except KeyboardInterrupt:
            if out_file is None:
                raise Interrupted("during the sweep; nothing was kept (use --out FILE to make a sweep "
                                  "resumable)") from None
            raise Interrupted(f"during the sweep; the finished points are in {out_file}, and the same command "
                              "skips them", resume=invocation()) from None
    if not world.main:
        return
    if result.resumed:
        err.print(f"resumed: {result.resumed} point(s) were already in {escape(str(out_file))}", highlight=False)
    if out_file is not None:
        made = f" (created {', '.join(str(d) for d in created)})" if created else ""
        err.print(f"wrote {escape(str(out_file))}{escape(made)}", highlight=False)
    payload = result.to_json()
    rows = summarize(payload, group=group)
    if plot_file is not None:
        from epx_cli.plot import plot_sweep

        write_output(plot_file, lambda path: plot_sweep(payload, rows, path, group=group, panel=panel))
    if as_json:
        click.echo(json.dumps(payload, indent=1, allow_nan=False))
    else:
        with out.natural_width(wide):
            out.print(Group(*sweep_report(payload, rows, group)))
    failed = sum(1 for record in payload["records"] if record["status"] != "ok")
    if failed:
        err.print(f"[yellow]note:[/] {failed} of {len(payload['records'])} run(s) failed; their messages are in the "
                  "table of failed runs and in the JSON")
