"""`epx analyze`: diagnostics of a model's free dynamics (the science is in :mod:`ep_core.analysis`).

    epx analyze antisymmetry --model cet --vary-s 0,0.5,1,2      ||A_J v|| / ||J v|| at the free end point
    epx analyze fixed-point --model cet --model-set project=true  converged, contracting, or unstable?
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table
from rich.text import Text

from ep_core.config import ConfigError
from epx_cli.main import (HandledGroup, OutputPath, UnitLog, apply_options, check_device, emit, err,
                          model_data_options, out, registry, warn, wide_option, write_output)
from epx_cli.render import Stacked, colour_legend, fmt_number

if TYPE_CHECKING:
    import torch

    from ep_core.session import Data

ANTISYMMETRY_FORMAT = "epx.analysis.antisymmetry/1"
FIXED_POINT_FORMAT = "epx.analysis.fixed-point/1"

model_options = apply_options([
    *model_data_options(),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
    click.option("--out", "out_file", type=OutputPath(), default=None,
                 help="Also write the result as JSON to this file (atomically)."),
    wide_option,
])


class Setup:
    """What both subcommands share: the model's registry entry, the user's settings, the images."""

    def __init__(self, model_name: str, model_settings: tuple[str, ...], data: str, data_dir: str | None,
                 no_download: bool, batch_size: int, seed: int, device: str, dtype: str):
        from ep_core.session import parse_settings

        check_device(device)
        self.registry = registry()
        self.model_name = model_name
        self.model_class = self.registry.get("model", model_name).factory
        self.settings = parse_settings(model_settings, "--model-set")
        self.config = self.model_class.Config.from_mapping(self.settings)
        self.data, self.data_dir, self.download = data, data_dir, not no_download
        self.batch_size, self.seed, self.device, self.dtype = batch_size, seed, device, dtype
        self.dataset: Any = None

    def build(self, overrides: dict[str, str] | None = None) -> tuple[Any, Data]:
        """(model, prepared batch) with ``overrides`` on top of the user's settings; the data are loaded once."""
        from ep_core.protocols import EquilibriumModel
        from ep_core.session import build_problem

        problem = build_problem(self.registry, self.model_name, model_settings={**self.settings, **(overrides or {})},
                                data=self.data, data_dir=self.data_dir, download=self.download, warn=warn,
                                batch_size=self.batch_size, seed=self.seed, dtype=self.dtype, device=self.device,
                                dataset=self.dataset)
        self.dataset = problem.dataset
        if not isinstance(problem.model, EquilibriumModel):
            raise ConfigError("model", f"{self.model_name} is not an EquilibriumModel (no force to relax); "
                                       "analyze needs one, e.g. cet or toy")
        return problem.model, problem.batch()

    def generator(self) -> torch.Generator:
        from ep_core.seeding import PROBE_STREAM, generator

        # A CPU generator: the same probe vectors on every device.
        return generator(self.seed, PROBE_STREAM)

    def meta(self, format: str, data: dict[str, Any]) -> dict[str, Any]:
        from ep_core.harness import environment

        return {"format": format, "model": {"name": self.model_name, "config": self.config.to_dict()},
                "data": data, "seed": self.seed, "dtype": self.dtype, "device": self.device,
                "environment": environment()}


def heading(analysis: str, result: dict[str, Any], varied: str | None = None) -> str:
    config = result["model"]["config"]
    knobs = ", ".join(f"{k}={config[k]}" for k in ("s", "T1", "eps", "project", "conservative")
                      if k in config and k != varied)
    source = result["data"]
    return (f"{analysis} on {result['model']['name']} ({knobs}) · data: {source['name']} "
            f"({source.get('batch_size')} samples) · {result['dtype']} {result['device']} · "
            f"seed {result['seed']}")


def show(result: dict[str, Any], title: str, table: Table, notes: list[str], as_json: bool,
         out_file: Path | None, wide: bool, *, keys: int, colours: str) -> None:
    """The table (its first ``keys`` columns repeated if it has to be split), and a legend of its ``colours``."""
    table.title = title
    with out.natural_width(wide):
        emit(result, [Stacked(table, keys=keys), colour_legend(colours)], notes, as_json=as_json, out_file=out_file)


def parse_values(text: str, option: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise ConfigError(option, f"expected comma-separated values such as 0,0.5,1,2, got {text!r}")
    if len(set(values)) != len(values):
        raise ConfigError(option, f"repeated values in {text!r}")
    return values


def fmt_ratio(summary: dict[str, Any]) -> str:
    if summary["mean"] is None:
        return "n/a"
    return f"{summary['mean']:.3g} ± {summary['std']:.2g}"


def fmt_residual(value: float, tol: float) -> Text:
    return Text(f"{value:.1e}", style="" if value <= tol else "red")


@click.group(cls=HandledGroup, context_settings={"help_option_names": ["-h", "--help"]})
def analyze() -> None:
    """Diagnose a model's free dynamics: non-conservativeness and fixed-point stability."""


@analyze.command()
@model_options
@click.option("--samples", default=8, show_default=True, type=click.IntRange(min=2),
              help="Random directions v; the table shows mean ± std over them.")
@click.option("--vary-s", "vary_s", default=None, metavar="S1,S2,...",
              help="One row per value of the model's non-conservative scale s, e.g. 0,0.5,1,2.")
def antisymmetry(model_name: str, model_settings: tuple[str, ...], data: str, data_dir: str | None,
                 no_download: bool, batch_size: int, seed: int, device: str, dtype: str, as_json: bool,
                 out_file: Path | None, samples: int, vary_s: str | None, wide: bool) -> None:
    """||A_J v|| / ||J v|| at the free end point, A_J the antisymmetric part of the force Jacobian J.

    Per part of the state and for the whole state, mean ± std over random v. 0 means the force is a gradient
    field there (EP is exact); it grows with the non-conservative part.

    \b
    epx analyze antisymmetry --model cet --vary-s 0,0.25,0.5,1,2,4
    """
    from ep_core.analysis import antisymmetry as measure
    from ep_core.harness import CONVERGED_TOL

    setup = Setup(model_name, model_settings, data, data_dir, no_download, batch_size, seed, device, dtype)
    rows: list[dict[str, str]] = [{}]
    if vary_s is not None:
        if "s" not in {row["name"] for row in setup.model_class.Config.describe()}:
            raise ConfigError("--vary-s", f"{model_name} has no option s; use a model with a "
                                          "non-conservative scale, such as cet")
        if "s" in setup.settings:
            raise ConfigError("--vary-s", "s is also given with --model-set; give it in one place")
        rows = [{"s": value} for value in parse_values(vary_s, "--vary-s")]
    results, description = [], {}
    log = UnitLog("antisymmetry")
    with err.status("starting") as status:
        for done, overrides in enumerate(rows):
            label = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the model"
            status.update(f"[{done}/{len(rows)}] {label}")
            log.start(label, done, len(rows))
            model, prepared = setup.build(overrides)
            description = prepared.description
            settings = {key: getattr(model.config, key) for key in overrides}
            results.append({"settings": settings, **measure(model, prepared.batch, samples=samples,
                                                            generator=setup.generator())})
        log.finish()
    result = {**setup.meta(ANTISYMMETRY_FORMAT, description), "samples": samples,
              "converged_tol": CONVERGED_TOL, "vary": None if vary_s is None else "s", "results": results}

    table = Table(header_style="bold")
    if vary_s is not None:
        table.add_column("s", justify="right")
    parts = list(results[0]["parts"])
    for part in [*parts, "whole state"]:
        table.add_column(part, justify="right")
    table.add_column("residual", justify="right")
    notes = []
    for row in results:
        table.add_row(*([str(row["settings"]["s"])] if vary_s is not None else []),
                      *(fmt_ratio(row["parts"][p]) for p in parts), fmt_ratio(row["whole"]),
                      fmt_residual(row["residual"], CONVERGED_TOL))
        if not row["converged"]:
            where = f"s={row['settings']['s']}: " if vary_s is not None else ""
            notes.append(f"{where}the free phase did not converge (residual {row['residual']:.1e} > "
                         f"{CONVERGED_TOL:g}): J is taken where T1 steps end, not at a fixed point; see "
                         "`epx analyze fixed-point`")
    title = heading(f"antisymmetry ||A_J v|| / ||J v||, mean ± std over {samples} v", result, result["vary"])
    show(result, title, table, notes, as_json, out_file, wide, keys=int(vary_s is not None),
         colours=f"residual red above {CONVERGED_TOL:.0e} (the free phase did not converge; see the note)")


@analyze.command("fixed-point")
@model_options
@click.option("--iterations", default=50, show_default=True, type=click.IntRange(min=1),
              help="Arnoldi steps (vjp applications) for the spectral radius of J_G.")
def fixed_point(model_name: str, model_settings: tuple[str, ...], data: str, data_dir: str | None,
                no_download: bool, batch_size: int, seed: int, device: str, dtype: str, as_json: bool,
                out_file: Path | None, iterations: int, wide: bool) -> None:
    """Did the free phase converge, is it still contracting, or is there no stable fixed point nearby?

    Runs T1 free steps and T1 more on the same trajectory, and reports the residual at T1 and 2·T1 and the
    spectral radius ρ of J_G = ∂G/∂x where it ends (Arnoldi through the vjp of G): ρ ≥ 1 means the dynamics
    expand there.

    \b
    epx analyze fixed-point --model cet --model-set project=true --model-set s=2 --model-set T1=400
    """
    from ep_core.analysis import CONVERGED, diagnose_fixed_point

    setup = Setup(model_name, model_settings, data, data_dir, no_download, batch_size, seed, device, dtype)
    with err.status("relaxing"):
        model, prepared = setup.build()
        diagnosis = diagnose_fixed_point(model, prepared.batch, iterations=iterations,
                                         generator=setup.generator())
    result = {**setup.meta(FIXED_POINT_FORMAT, prepared.description), "iterations": iterations,
              "diagnosis": diagnosis}

    T, tol = diagnosis["T1"], diagnosis["converged_tol"]
    spectral = diagnosis["spectral"]
    rho, ritz = spectral["rho"], spectral["ritz"]
    sign = "-" if ritz["imag"] < 0 else "+"
    table = Table(header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row(f"residual at T1={T}", fmt_residual(diagnosis["residual_T"], tol))
    table.add_row(f"residual at 2·T1={2 * T}", fmt_residual(diagnosis["residual_2T"], tol))
    table.add_row("residual factor per step", fmt_number(diagnosis["rate"], ".4f"))
    table.add_row("residual of G∘G", f"{diagnosis['residual_G2']:.1e}")
    table.add_row(f"ρ(J_G) at step {2 * T}", Text(f"{rho:.4f}", style="red" if rho >= 1 else "green"))
    table.add_row("largest Ritz value", f"{ritz['real']:.4f} {sign} {abs(ritz['imag']):.4f}i")
    table.add_row("Ritz residual", f"{spectral['ritz_residual']:.1e}")
    table.add_row("power-iteration estimate", f"{spectral['power']:.4f}")
    table.add_row("vjp applications", str(spectral["applications"]))
    verdict = diagnosis["verdict"]
    table.add_row("verdict", Text(verdict, style="bold green" if verdict == CONVERGED else "bold red"))
    show(result, heading("fixed-point diagnosis", result), table, [diagnosis["advice"]], as_json, out_file, wide,
         keys=1, colours=f"red for a residual above {tol:.0e}, ρ ≥ 1 (the dynamics expand) or any verdict but "
                         f"{CONVERGED}; green for ρ < 1 and {CONVERGED}")


LAYERNORM_FORMAT = "epx.analysis.layernorm/1"


@analyze.command()
@click.option("--model", "-m", "model_name", default="localgpt", show_default=True,
              help="A LocalModel (see `epx list models`).")
@click.option("--estimator", default="fa", show_default=True,
              help="The estimator trained with, whose backward pass is decomposed (it must choose backward rules).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Estimator option, e.g. mode=sign, ln=center_scale.")
@click.option("--model-set", "model_settings", multiple=True, metavar="KEY=VALUE",
              help="Model option, e.g. layers=2 (attn comes from --attn).")
@click.option("--attn", default="softmax", show_default=True, metavar="KIND[,KIND]",
              help="Attention kinds to study, one training run each: softmax, sigmoid or softmax,sigmoid.")
@click.option("--steps", default=250, show_default=True, type=click.IntRange(min=1),
              help="Training steps before the diagnostic batch (seed 003: 250, AdamW lr 1e-3, constant).")
@click.option("--data", default="auto", show_default=True, help="Text dataset; 'auto': tiny Shakespeare if found.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Where to look for data first (then $EPX_DATA_DIR, ~/.cache/epx).")
@click.option("--no-download", is_flag=True, help="Never try to download data.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Windows per training batch and in the diagnostic batch.")
@click.option("--seed", default=1337, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Seeds initialisation, data, feedback matrices and the diagnostic batch.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--out", "out_file", type=OutputPath(), default=None,
              help="Also write the result as JSON to this file (atomically).")
@click.option("--plot", "plot_file", type=OutputPath(), default=None,
              help="Write a PNG: energy fractions and cosines per LayerNorm (needs matplotlib).")
@wide_option
def layernorm(model_name: str, estimator: str, settings: tuple[str, ...], model_settings: tuple[str, ...],
              attn: str, steps: int, data: str, data_dir: str | None, no_download: bool, batch_size: int,
              seed: int, device: str, dtype: str, as_json: bool, out_file: Path | None, plot_file: Path | None,
              wide: bool) -> None:
    """How much each part of LayerNorm's backward matters (seed 003): train, then decompose at every LayerNorm.

    After --steps of training with ESTIMATOR, one backward pass of it on a diagnostic batch: at each LayerNorm,
    the fractions of ||g||² (g = ∂L/∂z) in the mean and radial components that the exact backward removes, σ's
    mean and std, and the cosine of each surrogate (center_scale, projected, identity) to the exact backward;
    then the average over the LayerNorms.

    \b
    epx analyze layernorm --model localgpt --attn softmax,sigmoid
    epx analyze layernorm --set mode=sign --steps 500 --plot ln.png
    """
    from ep_core.harness import environment
    from ep_core.layernorm_study import COLUMNS, TRAINING, average, layernorm_decomposition
    from ep_core.local import ATTENTION_KINDS
    from ep_core.protocols import ChoosesBackwardRules
    from ep_core.seeding import EVAL_MASK_STREAM, PROBE_STREAM, generator
    from ep_core.session import draw_batch, parse_settings
    from ep_core.train import Progress, build_run, train

    check_device(device)
    kinds = parse_values(attn, "--attn")
    unknown = [k for k in kinds if k not in ATTENTION_KINDS]
    if unknown:
        raise ConfigError("--attn", f"unknown attention {', '.join(unknown)}; valid: {', '.join(ATTENTION_KINDS)}")
    parsed_model = parse_settings(model_settings, "--model-set")
    if "attn" in parsed_model:
        raise ConfigError("--model-set attn", "give the attention with --attn (it may list both kinds)")
    if plot_file is not None:
        from epx_cli.plot import require_matplotlib

        require_matplotlib()
    reg, log, runs = registry(), UnitLog("layernorm"), {}
    with err.status("starting") as status:
        for done, kind in enumerate(kinds):
            log.start(f"attn={kind}", done, len(kinds))
            run = build_run(reg, estimator, model_name, settings=parse_settings(settings, "--set"),
                            model_settings={**parsed_model, "attn": kind},
                            train_settings={**TRAINING, "steps": str(steps), "diagnose_every": "0"}, data=data,
                            data_dir=data_dir, download=not no_download, warn=warn, batch_size=batch_size, seed=seed,
                            dtype=dtype, device=device, reference=None)
            if not isinstance(run.estimator, ChoosesBackwardRules):
                raise ConfigError("--estimator", f"{estimator} does not expose its backward rules "
                                                 "(ChoosesBackwardRules); the study needs an estimator such as fa")

            def show_step(record: dict[str, Any], kind: str = kind) -> None:
                if record["kind"] == "train":
                    status.update(f"attn={kind}: step {record['step']}/{steps} · loss {record['loss']:.4f}")

            records = train(run, progress=Progress(on_record=show_step))
            batch = draw_batch(run.model, run.dataset, batch_size, data=generator(seed, PROBE_STREAM),
                               mask=generator(seed, EVAL_MASK_STREAM))
            layers = layernorm_decomposition(run.model, batch, run.estimator.backward_rules(run.model))
            runs[kind] = {"layers": layers, "average": average(layers), "spec": run.spec,
                          "val_loss": [r for r in records if r["kind"] == "eval"][-1]["val_loss"],
                          "data": run.data_description}
        log.finish()
    study = {"estimator": estimator, "model": model_name, "steps": steps, "batch_size": batch_size, "seed": seed,
             "runs": runs}
    result = {"format": LAYERNORM_FORMAT, **study, "dtype": dtype, "device": device, "environment": environment()}
    renderables: list[Any] = []
    headers = {"r_mean": "r_mean", "r_radial": "r_radial", "sigma_mean": "σ mean", "sigma_std": "σ std",
               "cos_center_scale": "cos center_scale", "cos_identity": "cos identity",
               "batch_cos_center_scale": "batch cos center_scale", "batch_cos_projected": "batch cos projected",
               "batch_cos_identity": "batch cos identity"}
    for kind, run in study["runs"].items():
        table = Table(header_style="bold", title_justify="left")
        config = run["spec"]["estimator"]["config"]
        loss = "n/a" if run["val_loss"] is None else f"{run['val_loss']:.4f}"
        table.title = (f"attn={kind}: {estimator} ({', '.join(f'{k}={v}' for k, v in config.items() if v != '')}) "
                       f"after {steps} steps, val loss {loss} · {run['data']['name']} · seed {seed}")
        table.add_column("LayerNorm")
        for key in COLUMNS:
            table.add_column(headers[key], justify="right")
        for name, row in [*run["layers"].items(), ("average", run["average"])]:
            cells = [fmt_number(row[key], ".3f" if key.startswith("sigma") else ".4f") for key in COLUMNS]
            table.add_row(Text(name, style="bold" if name == "average" else ""), *cells)
        renderables.append(Stacked(table, keys=1))
    notes = ["r_mean, r_radial: fractions of ||g||² (g = ∂L/∂z at the LayerNorm) in the mean and radial components "
             "the exact backward removes · cos: mean over positions of the cosine of a surrogate's input gradient "
             "to the exact one (seed 003's; projected's is 1 by construction) · batch cos: the cosine over the whole "
             "batch, which sees how σ weighs the positions"]
    with out.natural_width(wide):
        emit(result, renderables, notes, as_json=as_json, out_file=out_file)
    if plot_file is not None:
        from epx_cli.plot import plot_layernorm

        write_output(plot_file, lambda path: plot_layernorm(result, path))
