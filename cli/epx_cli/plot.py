"""Plots of sweeps. matplotlib is an optional extra (pip install 'epx[plot]'): only --plot needs it."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

from ep_core.config import ConfigError
from ep_core.files import write_atomic

INSTALL_HINT = "--plot needs matplotlib: pip install 'epx[plot]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("plot", INSTALL_HINT) from None


def _as_numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _series(positions: list[float], rows: list[dict[str, Any] | None], label: str | None,
            metric: str) -> tuple[list[float], list[float], list[float]]:
    """x, mean, std of one metric (an estimator's, or the row's own when ``label`` is None), skipping gaps."""
    xs, means, stds = [], [], []
    for x, row in zip(positions, rows):
        if row is None or not row["seeds"]:
            continue
        stat = row[metric] if label is None else row["estimators"][label][metric]
        if stat is not None:
            xs.append(x)
            means.append(stat[0])
            stds.append(stat[1])
    return xs, means, stds


def plot_sweep(sweep: dict[str, Any], rows: list[dict[str, Any]], path: Path, *, group: str | None,
               panel: str) -> None:
    """Cosine to the reference against the first varied knob (one line per estimator and per combination of
    the other knobs; error bars are the std over seeds), and below it ms per gradient or the free-phase residual."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    spec = sweep["spec"]
    x_axis, *other_axes = sweep["axes"]
    numbers = _as_numbers(x_axis["values"])
    positions = numbers if numbers is not None else list(range(len(x_axis["values"])))
    log_x = numbers is not None and min(numbers) > 0 and max(numbers) / min(numbers) >= 20
    labels = list(dict.fromkeys(label for row in rows for label in row["estimators"]))
    compared = [label for label in labels if label != spec["reference"]]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    styles = ["-", "--", ":", "-."]
    combos = list(itertools.product(*(axis["values"] for axis in other_axes))) or [()]
    for number, combo in enumerate(combos):
        style = styles[number % len(styles)]
        fixed = dict(zip((axis["key"] for axis in other_axes), combo))
        suffix = "".join(f", {k}={v}" for k, v in fixed.items())
        line_rows = [next((r for r in rows if r["values"][x_axis["key"]] == value
                           and all(r["values"][k] == v for k, v in fixed.items())), None)
                     for value in x_axis["values"]]

        for label in compared:
            xs, ys, errs = _series(positions, line_rows, label, "group_cosine" if group else "cosine")
            top.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color=colour[label], linestyle=style,
                         label=f"{label}{suffix}")
        if panel == "ms":
            for label in labels:
                xs, ys, errs = _series(positions, line_rows, label, "ms")
                bottom.errorbar(xs, ys, yerr=errs, marker="s", capsize=3, color=colour[label], linestyle=style,
                                label=f"{label}{suffix}")
        else:
            xs, ys, errs = _series(positions, line_rows, None, "residual")
            bottom.errorbar(xs, ys, yerr=errs, marker="s", capsize=3, color="black", linestyle=style,
                            label=f"free phase{suffix}")
        for x, row in zip(positions, line_rows):
            if row is not None and not row["seeds"]:
                top.axvline(x, color="red", linestyle=":", linewidth=1)
                top.annotate(f"failed{suffix}", (x, 0.02), xycoords=("data", "axes fraction"), color="red",
                             rotation=90, fontsize="small", ha="right", va="bottom")

    top.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    top.set_ylabel(f"cosine to {spec['reference']} ({group or 'all parameters'})")
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    fixed_settings = ", ".join(f"{k}={v}" for k, v in {**spec["model_settings"], **spec["settings"]}.items())
    top.set_title(f"{spec['model']}{' (' + fixed_settings + ')' if fixed_settings else ''}: "
                  f"{', '.join(compared)} vs {spec['reference']}", fontsize="medium")
    if panel == "ms":
        bottom.set_ylabel("ms per gradient (median)")
    else:
        bottom.set_ylabel("free-phase residual ||G(x*)−x*||/||x*||")
        bottom.set_yscale("log")
    bottom.legend(fontsize="small")
    bottom.grid(alpha=0.3)
    bottom.set_xlabel(x_axis["key"])
    if log_x:
        bottom.set_xscale("log")
        # A log axis adds minor ticks labelled like 2×10⁻¹ between and on top of the swept values' labels.
        bottom.xaxis.set_minor_locator(NullLocator())
    bottom.set_xticks(positions, x_axis["values"])
    save_png(fig, path)


def plot_training(runs: dict[str, list[dict[str, Any]]], path: Path, *, title: str,
                  reference_loss: float | None = None) -> None:
    """Training runs' log records: the loss per step (faint) and validation loss (markers) above, the cosine of
    each run's gradient to the reference below when the runs were diagnosed. ``reference_loss`` draws a line,
    e.g. ln(vocabulary), the loss of a uniform guess."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diagnosed = any("diagnostic" in r for records in runs.values() for r in records)
    fig, axes = plt.subplots(2 if diagnosed else 1, 1, figsize=(7.5, 7 if diagnosed else 4.5), sharex=True,
                             squeeze=False)
    loss_axis = axes[0][0]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (label, records) in enumerate(runs.items()):
        colour = palette[number % len(palette)]
        train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and r.get("loss") is not None]
        evals = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
        if train:
            loss_axis.plot(*zip(*train), color=colour, alpha=0.3, linewidth=0.8, label=f"{label} train")
        if evals:
            loss_axis.plot(*zip(*evals), color=colour, marker="o", markersize=3, label=f"{label} validation")
        if diagnosed:
            cosines = [(r["step"], r["diagnostic"]["cosine"]) for r in records
                       if "diagnostic" in r and r["diagnostic"]["cosine"] is not None]
            if cosines:
                axes[1][0].plot(*zip(*cosines), color=colour, marker="s", markersize=3, label=label)
    if reference_loss is not None:
        loss_axis.axhline(reference_loss, color="grey", linestyle="--", linewidth=0.8, label="uniform guess")
    loss_axis.set_ylabel("loss C(x*)")
    loss_axis.set_title(title, fontsize="medium")
    loss_axis.legend(fontsize="small")
    loss_axis.grid(alpha=0.3)
    if diagnosed:
        axes[1][0].set_ylabel("cosine to the reference gradient")
        axes[1][0].axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        axes[1][0].legend(fontsize="small")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    save_png(fig, path)


def save_png(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG atomically and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def plot_layernorm(result: dict[str, Any], path: Path) -> None:
    """`epx analyze layernorm`: per LayerNorm, the energy fractions (bars) and the surrogates' cosines to the exact
    backward (lines), one panel per attention kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False, sharey=True)
    for axis, (kind, run) in zip(axes[0], runs.items()):
        names = list(run["layers"])
        positions = range(len(names))
        for offset, (key, label) in zip((-0.2, 0.2), (("r_mean", "r_mean"), ("r_radial", "r_radial"))):
            axis.bar([p + offset for p in positions], [run["layers"][n][key] for n in names], width=0.4,
                     alpha=0.5, label=label)
        for key in ("batch_cos_center_scale", "batch_cos_projected", "batch_cos_identity"):
            axis.plot(list(positions), [run["layers"][n][key] for n in names], marker="o", markersize=3,
                      label=key.removeprefix("batch_cos_") + " (batch cosine)")
        axis.set_xticks(list(positions), names, rotation=45, ha="right", fontsize="small")
        axis.set_title(f"attn={kind} after {result['steps']} steps of {result['estimator']}", fontsize="medium")
        axis.set_ylim(0, 1.05)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of ||g||² · cosine to the exact backward")
    axes[0][-1].legend(fontsize="small")
    save_png(fig, path)
