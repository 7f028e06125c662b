"""`epx sweep`: a grid of comparisons, as a table, a resumable JSON file and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ep_core.config import ConfigError
from ep_core.protocols import parameter_groups
from ep_core.errors import Interrupted
from epx_cli.main import check_names, comparison_options, err, handle_errors, out, warn
from epx_cli.render import fmt_cosine, fmt_number


def _fmt(stat: tuple[float, float] | None, spec: str, seeds: int) -> str:
    if stat is None:
        return "n/a"
    mean, std = stat
    return f"{mean:{spec}} ± {std:{spec}}" if seeds > 1 else f"{mean:{spec}}"


def _cos(stat: tuple[float, float] | None, seeds: int) -> Text:
    if stat is None or seeds <= 1:
        return fmt_cosine(None if stat is None else stat[0])
    text = fmt_cosine(stat[0])
    return text + Text(f" ± {stat[1]:.4f}", style="dim")


def sweep_table(data: dict[str, Any], rows: list[dict[str, Any]], group: str | None) -> Table:
    spec = data["spec"]
    table = Table(title=f"sweep of {', '.join(spec['estimators'])} vs {spec['reference']} on {spec['model']} "
                        f"({len(spec['seeds'])} seed(s) per point)", title_justify="left", header_style="bold")
    for axis in data["axes"]:
        table.add_column(axis["key"], justify="right")
    labels = [label for row in rows for label in row["estimators"]]
    labels = list(dict.fromkeys(labels))
    compared = [label for label in labels if label != spec["reference"]]
    for label in compared:
        if group:
            table.add_column(f"{label} cos {group}", justify="right")
        table.add_column(f"{label} cos all", justify="right")
    for label in labels:
        table.add_column(f"{label} ms", justify="right")
    table.add_column("residual", justify="right")
    table.add_column("fp dist", justify="right")
    for row in rows:
        cells: list[Any] = [row["values"][axis["key"]] for axis in data["axes"]]
        if not row["seeds"]:
            message = row["errors"][0]
            cells += [Text("failed", style="red")] + [""] * (len(table.columns) - len(cells) - 2)
            cells.append(Text(message[:40] + ("…" if len(message) > 40 else ""), style="red"))
            table.add_row(*cells)
            continue
        for label in compared:
            stats = row["estimators"][label]
            if group:
                cells.append(_cos(stats["group_cosine"], row["seeds"]))
            cells.append(_cos(stats["cosine"], row["seeds"]))
        for label in labels:
            cells.append(_fmt(row["estimators"][label]["ms"], ".0f", row["seeds"]))
        cells.append(_fmt(row["residual"], ".1e", row["seeds"]))
        cells.append(fmt_number(row["fixed_point_distance"], ".1e"))
        table.add_row(*cells)
    return table


@click.command()
@comparison_options(repeats=1)
@click.option("--vary", "varies", multiple=True, required=True, metavar="KEY=V1,V2,...",
              help="A knob and its values; repeat for a grid. KEY is a model option (s, T1, eps, ...) or an "
                   "estimator option (beta, T2, clip, Tadj, ...); model.KEY or aep.KEY name the owner.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Run every point with seeds --seed, --seed+1, ...; the table shows mean ± std.")
@click.option("--group", default=None, help="Also show the cosine of this parameter group (e.g. attention).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON file, one record per point, rewritten atomically after each; rerunning the same "
                   "sweep with the same file skips the points already in it.")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep as JSON on stdout instead of a table.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: cosine against the first varied knob, one line per estimator (needs the "
                   "'plot' extra: pip install 'epx[plot]').")
@click.option("--panel", type=click.Choice(["ms", "residual"]), default="ms", show_default=True,
              help="What the plot's second panel shows.")
@handle_errors
def sweep(estimators: tuple[str, ...], model_name: str, reference: str, settings: tuple[str, ...],
          model_settings: tuple[str, ...], data: str, data_dir: str | None, no_download: bool, batch_size: int,
          seed: int, device: str, dtype: str, repeats: int, varies: tuple[str, ...], seeds: int,
          group: str | None, out_file: Path | None, as_json: bool, plot_file: Path | None, panel: str) -> None:
    """Compare ESTIMATORS against the reference at every point of a grid of knob values.

    \b
    epx sweep ep aep --model cet --vary s=0.25,0.5,1,2,4,8 --group attention --out s.json --plot s.png
    epx sweep ep aep --model cet --model-set s=2 --vary beta=0.005,0.01,0.02 --seeds 3
    """
    from ep_core.session import build_model, parse_settings
    from ep_core.sweep import SweepSpec, run_sweep, summarize

    if plot_file is not None:
        from epx_cli.plot import require_matplotlib

        require_matplotlib()
    reg = check_names(estimators, model_name, reference, device)
    parsed_model_settings = parse_settings(model_settings, "--model-set")
    if group is not None:
        groups = parameter_groups(build_model(reg, model_name, parsed_model_settings))
        if group not in groups:
            raise ConfigError("group", f"{model_name} has no parameter group {group!r}; "
                                       f"valid: {', '.join(groups)}")
    spec = SweepSpec(estimators=estimators, model=model_name, reference=reference,
                     settings=parse_settings(settings, "--set"), model_settings=parsed_model_settings,
                     vary=varies, seeds=tuple(range(seed, seed + seeds)), data=data, batch_size=batch_size,
                     dtype=dtype, device=device, repeats=repeats)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("sweep", total=None)

        def on_point(index: int, total: int, point: Any) -> None:
            values = ", ".join(f"{k}={v}" for k, v in point.values.items())
            bar.update(task, total=total, completed=index, description=f"{values} seed {point.seed}")

        try:
            result = run_sweep(reg, spec, out=out_file, data_dir=data_dir, download=not no_download, warn=warn,
                               on_point=on_point)
        except KeyboardInterrupt:
            if out_file is None:
                raise Interrupted("during the sweep; nothing was kept (use --out FILE to make a sweep resumable)")
            raise Interrupted("during the sweep; the finished points are in " + str(out_file),
                              resume="the same command again (it skips the points already in --out)") from None
    if result.resumed:
        err.print(f"resumed: {result.resumed} point(s) were already in {escape(str(out_file))}", highlight=False)
    if out_file is not None:
        err.print(f"wrote {escape(str(out_file))}", highlight=False)
    payload = result.to_json()
    rows = summarize(payload, group=group)
    if plot_file is not None:
        from epx_cli.plot import plot_sweep

        plot_sweep(payload, rows, plot_file, group=group, panel=panel)
        err.print(f"wrote {escape(str(plot_file))}", highlight=False)
    if as_json:
        click.echo(json.dumps(payload, indent=1, allow_nan=False))
    else:
        out.print(sweep_table(payload, rows, group))
    failed = sum(1 for record in payload["records"] if record["status"] != "ok")
    if failed:
        err.print(f"[yellow]note:[/] {failed} point(s) failed; their messages are in the table and the JSON")
