"""Rich renderings of epx results. Pure presentation: every number comes from the JSON form of a result.

No table ever cuts a number or a header: one wider than the console is stacked (:class:`Stacked`: split into
several tables that each repeat its key columns), headers are short, and a legend under the tables says what
they and the colours mean. Colour only ever repeats what the text already says, for terminals without it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, ConsoleDimensions, ConsoleOptions, RenderableType, RenderResult
from rich.table import Column, Table
from rich.text import Text

from ep_core.summary import mean_std

# Without COLUMNS and a terminal, output is read later (a file, a pager, CI logs) where long lines cost little.
PIPED_WIDTH = 200
# --wide: wider than any table epx prints, so none is split; not unlimited, as rich pads some lines to the width.
NATURAL_WIDTH = 10_000
GREEN, YELLOW = 0.999, 0.99
COSINE_COLOURS = f"cosine green ≥ {GREEN} (then 5 decimals), yellow ≥ {YELLOW}, red < {YELLOW}"


class StdoutConsole(Console):
    """stdout, as wide as $COLUMNS when set, else as the terminal, else (piped) PIPED_WIDTH. rich fixes the width
    once, when the console is made at import; this one looks again at every print, so that a COLUMNS set later
    counts (click's CliRunner sets it per invocation)."""

    natural = False

    @property
    def size(self) -> ConsoleDimensions:
        width, height = super().size
        columns = os.environ.get("COLUMNS", "")
        if self.natural:
            width = NATURAL_WIDTH
        elif columns.isdigit() and int(columns) > 0:
            width = int(columns)
        elif not self.file.isatty():
            width = PIPED_WIDTH
        return ConsoleDimensions(width, height)

    @contextmanager
    def natural_width(self, wide: bool) -> Iterator[None]:
        """With ``wide`` (--wide), print tables at their natural width, unsplit, however long the lines get."""
        previous, self.natural = self.natural, self.natural or wide
        try:
            yield
        finally:
            self.natural = previous


class Stacked:
    """``table`` laid out for the width it is rendered at. Its title comes first, on a line of its own that wraps
    at spaces (a table's own title wraps at the table's width, mid-word when the table is narrow); then the table,
    or, when it is wider than the console, its columns packed greedily into as many tables as needed, each
    repeating the first ``keys`` columns (the ones that say what a row is); then its caption."""

    def __init__(self, table: Table, *, keys: int = 1):
        self.table, self.keys = table, keys

    def _part(self, columns: list[Column]) -> Table:
        part = copy.copy(self.table)
        part.title = part.caption = None
        # Fold rather than "…": should even one column not fit, a number wraps onto the next line whole.
        part.columns = [dataclasses.replace(c, _index=i, overflow="fold") for i, c in enumerate(columns)]
        return part

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.table.title:
            yield _line(self.table.title, "italic")
        keys, rest = self.table.columns[:self.keys], self.table.columns[self.keys:]
        unlimited = options.update(max_width=NATURAL_WIDTH)

        def fits(columns: list[Column]) -> bool:
            return console.measure(self._part(columns), options=unlimited).maximum <= options.max_width

        parts: list[list[Column]] = []
        current: list[Column] = []
        for column in rest:
            if current and not fits(keys + current + [column]):
                parts.append(current)
                current = []
            current.append(column)
        for part in [*parts, current]:
            yield self._part(keys + part)
        if self.table.caption:
            yield _line(self.table.caption)


def _line(text: RenderableType, style: str = "") -> RenderableType:
    return Text(text, style=style) if isinstance(text, str) else text


def legend(*entries: str) -> Text:
    return Text(" · ".join(entries), style="dim")


def colour_legend(*entries: str) -> Text:
    return legend("colours: " + entries[0], *entries[1:])


def fmt_cosine(value: float | None, *, doubtful: bool = False) -> Text:
    """At least 4 significant digits; 5 decimals from 0.999 on, where 4 would hide the differences that matter.
    ``doubtful``: the reference makes the cosine meaningless; marked ``?`` and dimmed."""
    if value is None:
        return Text("n/a", style="dim")
    style = "green" if value >= GREEN else "yellow" if value >= YELLOW else "red"
    text = f"{value:.5f}" if value >= GREEN else f"{value:.4f}" if abs(value) >= 0.1 else f"{value:#.4g}"
    return Text(text + " ?", style="dim") if doubtful else Text(text, style=style)


def fmt_number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def fmt_residual(value: float | None, converged: bool | None) -> Text:
    """The free-phase residual, marked `!` (and red) when the free phase did not converge."""
    if converged is False:
        return Text(f"{value:.1e} !", style="red")
    return Text(fmt_number(value, ".1e"))


def residual_colours(tol: float) -> str:
    return f"residual red and marked ! above {tol:.0e} (the free phase did not converge)"


def fmt_bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def comparison_title(data: dict[str, Any]) -> str:
    model = data["model"]
    knobs = ", ".join(f"{k}={model['config'][k]}" for k in ("s", "T1", "eps", "project", "conservative", "solver",
                                                             "dim", "blocks", "attn", "layers", "width")
                      if k in model["config"])
    source = data["data"]
    return (f"{', '.join(r['label'] for r in data['results'][1:])} vs {data['reference']} on {model['name']} "
            f"({knobs}) · data: {source['name']} ({source.get('batch_size')} samples) · "
            f"{data['dtype']} {data['device']}{captured_note(data)} · seed {data['seed']}")


def captured_note(data: dict[str, Any]) -> str:
    """Which rows' times are replays of a CUDA graph (module ep_core.capture), when any are."""
    captured = [r["label"] for r in data["results"] if r.get("execution") in ("captured", "stacked")]
    if not captured:
        return ""
    stacked = [r["label"] for r in data["results"] if r.get("execution") == "stacked"]
    which = "" if len(captured) == len(data["results"]) else f": {', '.join(captured)}"
    problems = (data.get("group") or {}).get("size")
    batched = "" if not stacked else f"; {', '.join(stacked)} stacked over the {problems} problems"
    return f" (CUDA graphs{which}{batched})"


def comparison_table(data: dict[str, Any]) -> Table:
    groups = list(data["parameter_groups"])
    lines = [fixed_point_line(data) or residual_stream_line(data), *(line(data) for line in TOLERANCE_LINES)]
    caption = "\n".join(line for line in lines if line) or None
    table = Table(title=comparison_title(data), caption=caption, header_style="bold")
    doubtful = data.get("meaningful") is False
    table.add_column("estimator", no_wrap=True)
    for header in ("cos\nall", *(f"cos\n{g}" for g in groups), "rel\nerr", "norm\nratio", "ms", "peak\nmem",
                   "residual", "F\nevals"):
        table.add_column(header, justify="right")
    for row in data["results"]:
        metrics = row["metrics"]
        mark = doubtful and row["label"] != data["reference"]
        table.add_row(
            row["label"] + (" (ref)" if row["label"] == data["reference"] else "")
            + (" (measured once for an earlier, identical problem)" if row.get("shared_measurement") else ""),
            fmt_cosine(metrics["cosine"], doubtful=mark),
            *(fmt_cosine(metrics["groups"].get(g), doubtful=mark) for g in groups),
            fmt_number(metrics["rel_error"], ".3g"),
            fmt_number(metrics["norm_ratio"], ".3g"),
            fmt_number(row["ms_median"], ".1f"),
            fmt_bytes(row["peak_memory_bytes"]),
            fmt_residual(row["residual"], row["converged"]),
            fmt_evaluations(row),
        )
    return table


def fmt_evaluations(row: dict[str, Any]) -> str:
    """Force evaluations, and beside them those of −∇E alone (aep's uncapped nudged steps on a model that declares
    F − N), which cost less than a force but are work all the same."""
    forces = fmt_number(row["force_evals"], "d")
    conservative = row.get("stats", {}).get("conservative_evals")
    return f"{forces} + {conservative} −∇E" if conservative else forces


def fixed_point_line(data: dict[str, Any]) -> str | None:
    """The reference's free phase: residual, and whether its end point is an attracting fixed point."""
    reference = data["results"][0]
    stability = data.get("fixed_point")
    if reference["residual"] is None:
        return None
    line = (f"free phase ({data['reference']}): residual {reference['residual']:.2e} "
            f"({'converged' if reference['converged'] else 'NOT converged'})")
    if stability:
        verdict = "stable fixed point" if stability["stable"] else "NOT a stable fixed point"
        unsure = "" if stability["resolved"] else ", not resolved: ρ is within the Ritz residual of 1"
        line += f" · ρ(J_G) = {stability['spectral_radius']:.4f} ({verdict}{unsure})"
    return line


def unreached_tolerance_line(data: dict[str, Any], where: str = "") -> str | None:
    """The phases that a solver with a tolerance (solver=anderson) left before reaching it, by row: a nudged phase's
    residual is relative to its displacement from x*, which float32 resolves only to about ε₃₂·‖x*‖ / ‖x − x*‖."""
    stopped = [f"{row['label']} ({_phase_counts(unreached)})" for row, phases in _recorded_phases(data)
               if (unreached := [p for p in phases if p["converged"] is False])]
    if not stopped:
        return None
    return (f"tolerance NOT reached (tol = {data['model']['config']['tol']:g}){where}: {'; '.join(stopped)} "
            f"stopped on their bound of evaluations (T1, T2) or where the residual stopped falling")


def resolution_line(data: dict[str, Any], where: str = "") -> str | None:
    """The phases that a solver with a tolerance left converged to the state's resolution, above the tolerance:
    ‖G(x) − x‖ within one rounding of x (ε·‖G(x)‖), where a smaller residual no longer means a better fixed point;
    float32 resolves a nudged phase's displacement only to about ε₃₂·‖x*‖ / ‖x − x*‖."""
    recorded = _recorded_phases(data)
    if not recorded:
        return None
    tol = data["model"]["config"]["tol"]
    stopped = [f"{row['label']} ({_phase_counts(coarse)}, residual up to {max(p['residual'] for p in coarse):.1e})"
               for row, phases in recorded
               if (coarse := [p for p in phases if p["converged"] and (p.get("residual") or 0) > tol])]
    if not stopped:
        return None
    return (f"tol = {tol:g} is finer than the state resolves{where}: {'; '.join(stopped)} stopped within one "
            f"rounding of the state")


TOLERANCE_LINES = (unreached_tolerance_line, resolution_line)
"""The notes on a tolerance solver's phases, in the order a caption lists them."""


def _recorded_phases(data: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(row, its relaxations' records) for each row that has them: only a solver with a tolerance records phases."""
    return [(row, phases) for row in data["results"] if (phases := row.get("stats", {}).get("phases"))]


def _phase_counts(phases: list[dict[str, Any]]) -> str:
    """'2 nudged phases, 1 free phase': how many of each kind of phase."""
    return ", ".join(f"{n} {phase} phase{'s' if n > 1 else ''}"
                     for phase, n in Counter(p["phase"] for p in phases).items())


def _first_of(lines: Iterable[str | None], unit: str) -> str | None:
    """The first of ``lines`` that is not None, and how many more there are (a seed's or a run's note, once)."""
    found = [line for line in lines if line]
    if not found:
        return None
    more = len(found) - 1
    return found[0] + (f" (and in {more} more {unit}{'s' if more > 1 else ''})" if more else "")


def _point(record: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in record["values"].items()) + f", seed {record['seed']}"


def residual_stream_line(data: dict[str, Any]) -> str | None:
    """A residual network's stream on the batch: seed 004's diagnostics."""
    stream = data.get("residual_stream")
    if not stream:
        return None
    line = (f"residual stream: median ‖h_L‖ {stream['h_L_norm']:.3g} · median ‖∂L/∂h_{stream['probe_layer']}‖ "
            f"{stream['grad_norm']:.3g} · largest block growth {stream['max_growth']:.3g}× · accuracy "
            f"{stream['accuracy']:.4f} on this batch")
    if stream["not_meaningful"]:
        line += " · cosines NOT meaningful: " + "; ".join(stream["not_meaningful"])
    return line


def parameter_table(data: dict[str, Any]) -> Table:
    """Cosine to the reference of each parameter's gradient, one row per estimator."""
    names = list(data["results"][0]["metrics"]["parameters"])
    table = Table(title=f"per-parameter cosine to {data['reference']}", header_style="bold")
    table.add_column("estimator", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    for row in data["results"][1:]:
        table.add_row(row["label"], *(fmt_cosine(row["metrics"]["parameters"][n]) for n in names))
    return table


def comparison_report(data: dict[str, Any], *, per_parameter: bool) -> list[RenderableType]:
    """What `epx compare` prints: the comparison, the per-parameter cosines if asked for, and the legend."""
    tables = [Stacked(comparison_table(data))] + ([Stacked(parameter_table(data))] if per_parameter else [])
    return [*tables,
            legend(f"cos: cosine to {data['reference']}'s gradient, of all parameters or of one group",
                   "rel err: ‖ĝ−g‖/‖g‖", "norm ratio: ‖ĝ‖/‖g‖", "ms: median per gradient", "peak mem: CUDA only",
                   "F evals: force evaluations (+ those of −∇E alone)",
                   "n/a: not measured, or the reference gradient is zero",
                   *(["?: not meaningful, see the note"] if data.get("meaningful") is False else [])),
            colour_legend(COSINE_COLOURS, residual_colours(data["converged_tol"]))]


def comparison_notes(data: dict[str, Any]) -> list[str]:
    notes = []
    for row in data["results"]:
        if row["converged"] is False:
            notes.append(f"{row['label']}: the free phase did not converge (residual {row['residual']:.1e} > "
                         f"{data['converged_tol']:g}); estimators that assume a fixed point are not expected "
                         f"to match — raise T1 (--model-set T1=...) or lower eps")
        if not row["deterministic"]:
            notes.append(f"{row['label']}: repeated runs with the same seed gave different gradients")
    if data.get("meaningful") is False:
        notes.append("the cosines (marked ?) are not meaningful: "
                     + "; ".join(data["residual_stream"]["not_meaningful"]))
    return notes


SEEDS_FORMAT = "epx.comparisons/1"


def seeds_table(data: dict[str, Any]) -> Table:
    """`epx compare --seeds N`: one row per seed (each estimator's overall cosine, the reference's residual), then
    the mean ± std over the seeds, and each estimator's ms for the N problems timed together."""
    comparisons = data["comparisons"]
    first = comparisons[0]
    labels = [r["label"] for r in first["results"]]
    compared = labels[1:]
    seeds = data["seeds"]
    title = comparison_title(first).rsplit(" · seed ", 1)[0] + f" · seeds {seeds[0]}–{seeds[-1]}"
    caption = (f"ms: median per gradient of all {len(seeds)} problems together"
               + (" (replays of one CUDA graph)" if captured_note(first) else ""))
    for line in TOLERANCE_LINES:
        note = _first_of((line(comparison, f" in seed {seed}") for seed, comparison in zip(seeds, comparisons)),
                         "seed")
        if note:
            caption += "\n" + note
    table = Table(title=title, header_style="bold", caption=caption)
    table.add_column("seed", justify="right", no_wrap=True)
    for label in compared:
        table.add_column(f"{label} cos\nall", justify="right")
    table.add_column("rel err\n" + (compared[0] if len(compared) == 1 else "(mean)"), justify="right")
    table.add_column("residual", justify="right")
    cosines: dict[str, list[float | None]] = {label: [] for label in compared}
    for seed, comparison in zip(seeds, comparisons):
        rows = {r["label"]: r for r in comparison["results"]}
        for label in compared:
            cosines[label].append(rows[label]["metrics"]["cosine"])
        errors = [rows[label]["metrics"]["rel_error"] for label in compared]
        known = [e for e in errors if e is not None]
        reference = rows[labels[0]]
        table.add_row(str(seed), *(fmt_cosine(rows[label]["metrics"]["cosine"]) for label in compared),
                      fmt_number(sum(known) / len(known) if known else None, ".3g"),
                      fmt_residual(reference["residual"], reference["converged"]))
    table.add_section()
    table.add_row("mean", *(_mean_cosine(mean_std(cosines[label]), len(seeds)) for label in compared), "", "")
    table.add_row("ms", *(fmt_number(rows["ms_median"], ".1f") for rows in first["results"][1:]), "",
                  fmt_number(first["results"][0]["ms_median"], ".1f") + f" ({labels[0]})")
    return table


def seeds_report(data: dict[str, Any]) -> list[RenderableType]:
    first = data["comparisons"][0]
    return [Stacked(seeds_table(data)),
            legend(f"cos: cosine to {first['reference']}'s gradient", "rel err: ‖ĝ−g‖/‖g‖",
                   f"residual: {first['reference']}'s free phase", "mean: over the seeds, ± their std",
                   "--json: every seed's whole comparison"),
            colour_legend(COSINE_COLOURS, residual_colours(first["converged_tol"]))]


def _mean(stat: tuple[float, float] | None, spec: str, seeds: int) -> str:
    if stat is None:
        return "n/a"
    mean, std = stat
    return f"{mean:{spec}} ± {std:{spec}}" if seeds > 1 else f"{mean:{spec}}"


def _mean_cosine(stat: tuple[float, float] | None, seeds: int) -> Text:
    if stat is None or seeds <= 1:
        return fmt_cosine(None if stat is None else stat[0])
    return fmt_cosine(stat[0]) + Text(f" ± {stat[1]:.4f}", style="dim")


def _seeds(row: dict[str, Any]) -> Text:
    done, run = row["seeds"], row["seeds_run"]
    return Text(f"{done}/{run}", style="" if done == run else "yellow" if done else "red")


def sweep_table(data: dict[str, Any], rows: list[dict[str, Any]], group: str | None) -> Table:
    """One row per point of the grid (rows from :func:`ep_core.sweep.summarize`): the point, how many of its seeds
    succeeded, and the mean ± std over those of every estimator's cosine and ms, the residual and fp dist."""
    spec = data["spec"]
    table = Table(title=f"sweep of {', '.join(spec['estimators'])} vs {spec['reference']} on {spec['model']} "
                        f"({len(spec['seeds'])} seed(s) per point)", header_style="bold")
    for axis in data["axes"]:
        table.add_column(axis["key"], justify="right", no_wrap=True)
    table.add_column("seeds", justify="right", no_wrap=True)
    labels = list(dict.fromkeys(label for row in rows for label in row["estimators"]))
    compared = [label for label in labels if label != spec["reference"]]
    for label in compared:
        if group:
            table.add_column(f"{label} cos\n{group}", justify="right")
        table.add_column(f"{label} cos\nall", justify="right")
    for label in labels:
        table.add_column(f"{label}\nms", justify="right")
    table.add_column("residual", justify="right")
    table.add_column("fp\ndist", justify="right")
    for row in rows:
        cells: list[RenderableType] = [Text(row["values"][axis["key"]]) for axis in data["axes"]] + [_seeds(row)]
        if not row["seeds"]:
            blank = len(table.columns) - len(cells) - 1
            table.add_row(*cells, Text("failed", style="red"), *[Text("—", style="dim")] * blank)
            continue
        for label in compared:
            stats = row["estimators"][label]
            if group:
                cells.append(_mean_cosine(stats["group_cosine"], row["seeds"]))
            cells.append(_mean_cosine(stats["cosine"], row["seeds"]))
        for label in labels:
            cells.append(_mean(row["estimators"][label]["ms"], ".0f", row["seeds"]))
        residual = _mean(row["residual"], ".1e", row["seeds"])
        cells.append(Text(f"{residual} !", style="red") if row["converged"] is False else Text(residual))
        cells.append(fmt_number(row["fixed_point_distance"], ".1e"))
        table.add_row(*cells)
    return table


def failures_table(data: dict[str, Any], rows: list[dict[str, Any]]) -> Table | None:
    """The runs that failed, with their whole messages (wrapped, never cut); one row per point and message, the
    seeds that failed with it listed together. None when nothing failed."""
    failed = sum(len(row["errors"]) for row in rows)
    if not failed:
        return None
    total = sum(row["seeds_run"] for row in rows)
    table = Table(title=f"failed runs: {failed} of {total} (a point's means are over its other seeds)",
                  header_style="bold")
    for axis in data["axes"]:
        table.add_column(axis["key"], justify="right", no_wrap=True)
    table.add_column("seeds", justify="right", no_wrap=True)
    table.add_column("error")
    for row in rows:
        seeds_by_message: dict[str, list[int]] = {}
        for seed, message in zip(row["failed_seeds"], row["errors"]):
            seeds_by_message.setdefault(message, []).append(seed)
        for message, seeds in seeds_by_message.items():
            table.add_row(*(Text(row["values"][axis["key"]]) for axis in data["axes"]),
                          ", ".join(str(s) for s in seeds), Text(message, style="red"))
    return table


def sweep_report(data: dict[str, Any], rows: list[dict[str, Any]], group: str | None) -> list[RenderableType]:
    """What `epx sweep` prints: the table of points, the failed runs, and the legend."""
    keys = len(data["axes"]) + 1
    failures = failures_table(data, rows)
    sizes = sorted({(record["comparison"].get("group") or {}).get("size", 1) for record in data["records"]
                    if record["status"] == "ok"})
    timing = "ms: median per gradient"
    if sizes and sizes[-1] > 1:
        timing = (f"ms: median of one run of all the problems measured together ({', '.join(map(str, sizes))}: a "
                  "point's seeds, and on CUDA the points that differ only in knobs that stack)")
    notes = [Text(note) for line in TOLERANCE_LINES
             if (note := _first_of((line(record["comparison"], f" at {_point(record)}")
                                    for record in data["records"] if record["status"] == "ok"), "run"))]
    return [Stacked(sweep_table(data, rows, group), keys=keys),
            *([Stacked(failures, keys=keys)] if failures else []),
            *notes,
            legend("seeds: succeeded/run; every number is the mean ± std over the seeds that succeeded",
                   f"cos: cosine to {data['spec']['reference']}'s gradient, of all parameters or of the group",
                   timing, f"residual: {data['spec']['reference']}'s free phase",
                   "fp dist: largest relative distance between two estimators' free equilibria"),
            colour_legend(COSINE_COLOURS, "residual red and marked ! where the free phase did not converge (for "
                          "any seed)", "seeds yellow when some failed, red when all did")]


def training_table(records: list[dict[str, Any]], title: str, converged_tol: float) -> Table:
    """One row per validation: mean training loss since the previous one, validation loss, and the latest
    comparison with the reference gradient."""
    groups = next((list(r["diagnostic"]["groups"]) for r in records if "diagnostic" in r), [])
    surrogates = any("layernorm" in r.get("diagnostic", {}) for r in records)
    table = Table(title=title, header_style="bold")
    for column in ("step", "train loss", "val loss", "lr", "residual", "cos all", *(f"cos {g}" for g in groups),
                   *(["LN cos (min)"] if surrogates else [])):
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
            residual = train.get("residual")
            table.add_row(
                str(record["step"]),
                fmt_number(sum(losses) / len(losses) if losses else None, ".4f"),
                fmt_number(record["val_loss"], ".4f"),
                fmt_number(train.get("lr"), ".2e"),
                fmt_residual(residual, None if residual is None else residual <= converged_tol),
                fmt_cosine(diagnostic["cosine"] if diagnostic else None),
                *(fmt_cosine(diagnostic["groups"].get(g) if diagnostic else None) for g in groups),
                *([fmt_cosine(min(diagnostic["layernorm"].values()) if diagnostic and diagnostic.get("layernorm")
                              else None)] if surrogates else []),
            )
            losses = []
    return table


def epoch_table(records: list[dict[str, Any]]) -> Table | None:
    """One row per epoch: accuracy on the whole held-out set and, for a residual network, its stream (seed 004's
    diagnostics on a fixed evaluation batch)."""
    epochs = [r for r in records if r["kind"] == "epoch"]
    if not epochs:
        return None
    table = Table(title="per epoch", header_style="bold")
    for column in ("epoch", "step", "test\naccuracy", "‖h_L‖", "‖∂L/∂h_k‖", "largest\ngrowth"):
        table.add_column(column, justify="right")
    for record in epochs:
        stream = record.get("stream") or {}
        table.add_row(str(record["epoch"]), str(record["step"]), fmt_number(record.get("test_accuracy"), ".4f"),
                      fmt_number(stream.get("h_L_norm"), ".3g"), fmt_number(stream.get("grad_norm"), ".3g"),
                      fmt_number(stream.get("max_growth"), ".3g"))
    return table


def training_report(records: list[dict[str, Any]], title: str, converged_tol: float) -> list[RenderableType]:
    """What `epx train` prints: one row per validation, one per epoch when the run counts epochs, and the legend."""
    epochs = epoch_table(records)
    return [Stacked(training_table(records, title, converged_tol)),
            *([Stacked(epochs)] if epochs is not None else []),
            legend("train loss: mean since the previous row", "val loss: on the held-out batches",
                   "residual: the trained estimator's free phase",
                   "cos: the latest cosine to the reference gradient (--ref), of all parameters or of one group",
                   *(["LN cos (min): the smallest, over the LayerNorms, cosine of the trained LayerNorm rule's input "
                      "gradient to the exact one (each LayerNorm's in the log)"]
                     if any("layernorm" in r.get("diagnostic", {}) for r in records) else []),
                   *(["‖h_L‖, ‖∂L/∂h_k‖ (k = 2), growth: medians on a fixed held-out batch of up to 1024"]
                     if epochs is not None else [])),
            colour_legend(COSINE_COLOURS, residual_colours(converged_tol))]
