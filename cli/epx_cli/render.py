"""Rich renderings of epx results. Pure presentation: every number comes from the JSON form of a result."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text


def fmt_cosine(value: float | None) -> Text:
    if value is None:
        return Text("n/a", style="dim")
    style = "green" if value >= 0.999 else "yellow" if value >= 0.99 else "red"
    digits = 5 if value >= 0.999 else 4
    return Text(f"{value:.{digits}f}", style=style)


def fmt_number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


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
    knobs = ", ".join(f"{k}={model['config'][k]}" for k in ("s", "T1", "eps", "project", "conservative")
                      if k in model["config"])
    source = data["data"]
    return (f"{', '.join(r['label'] for r in data['results'][1:])} vs {data['reference']} on {model['name']} "
            f"({knobs}) · data: {source['name']} ({source.get('batch_size')} samples) · "
            f"{data['dtype']} {data['device']} · seed {data['seed']}")


def comparison_table(data: dict[str, Any]) -> Table:
    groups = list(data["parameter_groups"])
    table = Table(title=comparison_title(data), title_justify="left", header_style="bold")
    table.add_column("estimator")
    table.add_column("cos all", justify="right")
    for group in groups:
        table.add_column(f"cos {group}", justify="right")
    for name, justify in (("rel err", "right"), ("norm ratio", "right"), ("ms/grad", "right"),
                          ("peak mem", "right"), ("residual", "right"), ("F evals", "right")):
        table.add_column(name, justify=justify)
    for row in data["results"]:
        metrics = row["metrics"]
        residual = Text(fmt_number(row["residual"], ".1e"),
                        style="red" if row["converged"] is False else "")
        table.add_row(
            row["label"] + (" (ref)" if row["label"] == data["reference"] else ""),
            fmt_cosine(metrics["cosine"]),
            *(fmt_cosine(metrics["groups"].get(g)) for g in groups),
            fmt_number(metrics["rel_error"], ".3g"),
            fmt_number(metrics["norm_ratio"], ".3g"),
            fmt_number(row["ms_median"], ".1f"),
            fmt_bytes(row["peak_memory_bytes"]),
            residual,
            fmt_number(row["force_evals"], "d"),
        )
    table.caption = fixed_point_line(data)
    table.caption_justify = "left"
    return table


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


def parameter_table(data: dict[str, Any]) -> Table:
    """Cosine to the reference of each parameter's gradient, one row per estimator."""
    names = list(data["results"][0]["metrics"]["parameters"])
    table = Table(title=f"per-parameter cosine to {data['reference']}", title_justify="left", header_style="bold")
    table.add_column("estimator")
    for name in names:
        table.add_column(name, justify="right")
    for row in data["results"][1:]:
        table.add_row(row["label"], *(fmt_cosine(row["metrics"]["parameters"][n]) for n in names))
    return table


def comparison_notes(data: dict[str, Any]) -> list[str]:
    notes = []
    for row in data["results"]:
        if row["converged"] is False:
            notes.append(f"{row['label']}: the free phase did not converge (residual {row['residual']:.1e} > "
                         f"{data['converged_tol']:g}); estimators that assume a fixed point are not expected "
                         f"to match — raise T1 (--model-set T1=...) or lower eps")
        if not row["deterministic"]:
            notes.append(f"{row['label']}: repeated runs with the same seed gave different gradients")
    return notes
