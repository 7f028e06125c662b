"""Regenerate docs/results/localgpt.md: seed 003 (feedback alignment with LayerNorm surrogates on a character GPT)
with the epx commands, on tiny Shakespeare on the CPU.

    EPX_DATA_DIR=../shared/data python docs/results/make_localgpt.py [--steps 500] [--fresh]

1. Seed 003's table: `epx analyze layernorm --attn softmax,sigmoid` (250 FA steps, then the decomposition).
2. A grid of FA mode (random, sign, transpose) × LayerNorm rule (exact, center_scale, projected, identity), each
   against backprop: the cosine per group at initialisation (`epx compare`) and over training (`epx train ...
   --ref backprop`, every 50 steps), and the validation loss after --steps steps, beside backprop's. transpose
   with exact is backprop itself and is left out. Three more runs ask the seed's question with sigmoid attention:
   backprop, and random FA with exact and with center_scale LayerNorms.

Training runs two at a time (one per core), each with one torch thread (epx's default). Every run's run.json and
the log records the page reads are kept in docs/results/data/localgpt-*/ (a run already there is skipped;
--fresh deletes them first); every number and the plot come from those files. It stops if a run fell back to
the generated sample.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from runner import train_two_at_a_time

from ep_core.files import write_atomic

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
PAGE = HERE / "localgpt.md"
PLOT = HERE / "localgpt.png"
MODES = ("random", "sign", "transpose")
RULES = ("exact", "center_scale", "projected", "identity")
GROUPS = ("embedding", "attention", "mlp", "layernorm", "head")
BIGRAM, UNIGRAM = 2.45, 3.31
"""Tiny Shakespeare's character-bigram and unigram entropies in nats: a model that beats the first has learnt more
than pairs of characters; one above the second has not learnt the character frequencies."""


def conditions() -> dict[str, list[str]]:
    """name → the `epx train` arguments after the estimator's name."""
    runs: dict[str, list[str]] = {"backprop": ["backprop"]}
    for mode in MODES:
        for rule in RULES:
            if (mode, rule) != ("transpose", "exact"):
                runs[f"fa-{mode}-{rule}"] = ["fa", "--set", f"mode={mode}", "--set", f"ln={rule}"]
    sigmoid = ["--model-set", "attn=sigmoid"]
    runs["backprop-sigmoid"] = ["backprop", *sigmoid]
    runs["fa-random-exact-sigmoid"] = ["fa", "--set", "mode=random", "--set", "ln=exact", *sigmoid]
    runs["fa-random-center_scale-sigmoid"] = ["fa", "--set", "mode=random", "--set", "ln=center_scale", *sigmoid]
    return runs


def epx(*args: str) -> None:
    print("$ epx " + shlex.join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "epx_cli", *args], check=True, stdout=subprocess.DEVNULL)


def train_all(steps: int) -> dict[str, list[dict[str, Any]]]:
    runs = conditions()
    missing = {f"localgpt-{name}": ["train", estimator, "--model", "localgpt", "--data", "shakespeare", "--steps",
                                    str(steps), "--ref", "backprop", "--diagnose-every", "50", "--eval-every", "50",
                                    *options]
               for name, (estimator, *options) in runs.items()
               if not (DATA / f"localgpt-{name}" / "log.jsonl").exists()}

    def keep(name: str, run: Path) -> None:
        target = DATA / name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "run.json", target / "run.json")
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        kept = [r for r in records if r["kind"] != "train" or r["step"] % 10 == 0 or "diagnostic" in r]
        write_atomic(target / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    train_two_at_a_time(missing, keep, prefix="epx-localgpt-")
    logs = {}
    for name in runs:
        run = json.loads((DATA / f"localgpt-{name}" / "run.json").read_text())
        if run["data"]["name"] != "shakespeare":
            raise SystemExit(f"localgpt-{name} trained on {run['data']['name']!r}, not tiny Shakespeare")
        if run["train"]["steps"] != steps:
            raise SystemExit(f"localgpt-{name} ran {run['train']['steps']} steps, not {steps}: use --fresh")
        logs[name] = [json.loads(line) for line in (DATA / f"localgpt-{name}" / "log.jsonl").read_text().splitlines()]
    return logs


def initial_cosines() -> dict[str, dict[str, Any]]:
    """`epx compare fa backprop` at initialisation for every FA condition (default attention)."""
    out = {}
    for name, (estimator, *options) in conditions().items():
        if estimator != "fa" or "attn=sigmoid" in options:
            continue
        path = DATA / f"localgpt-init-{name}.json"
        if not path.exists():
            epx("compare", "fa", "--ref", "backprop", "--model", "localgpt", "--data", "shakespeare", "--repeats", "1",
                *options, "--out", str(path))
        result = json.loads(path.read_text())
        out[name] = next(r for r in result["results"] if r["label"] == "fa")["metrics"]
    return out


def layernorm_table() -> dict[str, Any]:
    path = DATA / "localgpt-layernorm.json"
    if not path.exists():
        epx("analyze", "layernorm", "--model", "localgpt", "--data", "shakespeare", "--attn", "softmax,sigmoid",
            "--out", str(path))
    return json.loads(path.read_text())


def final_val(log: list[dict[str, Any]]) -> float:
    return [r for r in log if r["kind"] == "eval"][-1]["val_loss"]


def diagnostics(log: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(r["step"], r["diagnostic"]) for r in log if r["kind"] == "train" and "diagnostic" in r]


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot(logs: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, (loss, cosine) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, log in logs.items():
        if name.endswith("sigmoid"):
            continue
        evals = [(r["step"], r["val_loss"]) for r in log if r["kind"] == "eval"]
        style = {"color": "black", "linewidth": 2} if name == "backprop" else {"linewidth": 1}
        loss.plot(*zip(*evals), label=name, **style)
        if name != "backprop":
            series = diagnostics(log)
            cosine.plot([s for s, _ in series], [d["cosine"] for _, d in series], label=name, **style)
    for level, label in ((BIGRAM, "bigram entropy"), (UNIGRAM, "unigram entropy")):
        loss.axhline(level, color="grey", linestyle="--", linewidth=0.8)
        loss.annotate(label, (0, level), fontsize=7, color="grey", va="bottom")
    loss.set(xlabel="step", ylabel="validation loss (nats)", title="localgpt on tiny Shakespeare (softmax)")
    cosine.set(xlabel="step", ylabel="cosine to backprop (all parameters)", title="FA's gradient over training")
    for axis in (loss, cosine):
        axis.grid(alpha=0.3)
    loss.legend(fontsize=6, ncol=2)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    PLOT.write_bytes(buffer.getvalue())


def page(steps: int, study: dict[str, Any], init: dict[str, dict[str, Any]],
         logs: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["# Results on localgpt: seed 003 (feedback alignment with LayerNorm surrogates)", "",
             "Generated by `docs/results/make_localgpt.py` from the logs in `docs/results/data/localgpt-*`; do not "
             "edit by hand. Tiny Shakespeare characters, CPU, float32, one torch thread per run, seed 0 for the "
             "grid and seed 1337 (the seed's) for the LayerNorm table.", "",
             "## Seed 003's table: the LayerNorm backward after 250 FA steps", "",
             "`epx analyze layernorm --model localgpt --attn softmax,sigmoid` (fa: random feedback, exact "
             "LayerNorms; AdamW lr 1e-3, batch 32). r_mean, r_radial: the fractions of ‖g‖² (g = ∂L/∂z) in the "
             "mean and radial components that the exact backward removes; cos: mean over positions of the cosine "
             "of a surrogate's input gradient to the exact one (projected's is 1 by construction); batch cos: over "
             "the whole batch.", ""]
    columns = ("r_mean", "r_radial", "sigma_mean", "sigma_std", "cos_center_scale", "cos_identity",
               "batch_cos_center_scale", "batch_cos_projected", "batch_cos_identity")
    for kind, run in study["runs"].items():
        lines += [f"**attn={kind}** (validation loss after 250 steps {run['val_loss']:.3f})", "",
                  "| LayerNorm | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name, row in [*run["layers"].items(), ("**average**", run["average"])]:
            lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
        lines.append("")
    soft, sig = study["runs"]["softmax"]["average"], study["runs"]["sigmoid"]["average"]
    backprop = final_val(logs["backprop"])
    lines += [f"## FA mode × LayerNorm rule, {steps} steps", "",
              f"`epx train fa --model localgpt --set mode=M --set ln=R --steps {steps} --ref backprop` (softmax "
              "attention, seed 0); cosine to backprop's gradient overall and per group, at initialisation "
              "(`epx compare`, one batch) and averaged over the comparisons every 50 steps of training; the "
              f"validation loss after {steps} steps. Reference lines: the bigram entropy {BIGRAM} and the unigram "
              f"entropy {UNIGRAM} nats; ln(65) = {math.log(65):.2f} is a uniform guess.", "",
              "| mode | ln | cos at init | " + " | ".join(f"{g} at init" for g in GROUPS) +
              " | cos in training | " + " | ".join(f"{g} in training" for g in GROUPS) + f" | val loss @{steps} |",
              "|---|---|" + "---|" * (2 * len(GROUPS) + 3),
              "| backprop | | 1 | " + " | ".join("1" for _ in GROUPS) + " | 1 | " + " | ".join("1" for _ in GROUPS)
              + f" | **{backprop:.3f}** |"]
    for name, metrics in init.items():
        _, mode, rule = name.split("-", 2)
        series = [d for _, d in diagnostics(logs[name])]
        mean_all = statistics.fmean(d["cosine"] for d in series)
        mean_groups = {g: statistics.fmean(d["groups"][g] for d in series) for g in GROUPS}
        lines.append(f"| {mode} | {rule} | {cell(metrics['cosine'])} | "
                     + " | ".join(cell(metrics["groups"][g]) for g in GROUPS)
                     + f" | {cell(mean_all)} | " + " | ".join(cell(mean_groups[g]) for g in GROUPS)
                     + f" | {final_val(logs[name]):.3f} |")
    sig_exact = final_val(logs["fa-random-exact-sigmoid"])
    sig_center = final_val(logs["fa-random-center_scale-sigmoid"])
    soft_exact, soft_center = final_val(logs["fa-random-exact"]), final_val(logs["fa-random-center_scale"])
    radial = {kind: max(run["layers"].items(), key=lambda item: item[1]["r_radial"])
              for kind, run in study["runs"].items()}
    lines += ["", "![validation loss and cosine to backprop over training](localgpt.png)", "",
              "## The seed's question: why does center_scale cost more with softmax?", "",
              f"With random feedback, replacing the exact LayerNorm backward by center_scale changes the validation "
              f"loss after {steps} steps from {soft_exact:.3f} to {soft_center:.3f} with softmax attention "
              f"({soft_center - soft_exact:+.3f}) and from {sig_exact:.3f} to {sig_center:.3f} with sigmoid "
              f"attention ({sig_center - sig_exact:+.3f}); backprop reaches "
              f"{backprop:.3f} and {final_val(logs['backprop-sigmoid']):.3f}. center_scale keeps the radial "
              f"component z·mean(g⊙z) that the exact backward removes; after 250 FA steps it carries on average "
              f"r_radial = {soft['r_radial']:.4f} of ‖g‖² with softmax and {sig['r_radial']:.4f} with sigmoid "
              f"(the mean component: {soft['r_mean']:.4f} and {sig['r_mean']:.4f}), and center_scale's batch "
              f"cosine to the exact backward is {soft['batch_cos_center_scale']:.4f} and "
              f"{sig['batch_cos_center_scale']:.4f}. The largest radial share is at {radial['softmax'][0]} with "
              f"softmax ({radial['softmax'][1]['r_radial']:.4f}) and at {radial['sigmoid'][0]} with sigmoid "
              f"({radial['sigmoid'][1]['r_radial']:.4f}).", "",
              verdict(soft_center - soft_exact, sig_center - sig_exact, study), ""]
    return "\n".join(lines) + "\n"


def verdict(cost_softmax: float, cost_sigmoid: float, study: dict[str, Any]) -> str:
    """What these numbers say about the seed's question, in words that follow from them (one seed each)."""
    soft, sig = study["runs"]["softmax"]["average"], study["runs"]["sigmoid"]["average"]
    lowest = min(row["batch_cos_center_scale"] for run in study["runs"].values() for row in run["layers"].values())
    costlier = "softmax" if cost_softmax > cost_sigmoid else "sigmoid"
    text = (f"On these runs (one seed each) center_scale costs more with {costlier} attention "
            f"({cost_softmax:+.3f} against {cost_sigmoid:+.3f} nats). ")
    if (soft["r_radial"] > sig["r_radial"]) == (cost_softmax > cost_sigmoid):
        text += ("The radial component it keeps is also larger there, as the seed's explanation has it: the energy "
                 "center_scale fails to remove tracks what it costs.")
    else:
        text += ("Yet the radial component it keeps is the smaller one there, so its size alone does not explain "
                 f"the cost: center_scale's batch cosine to the exact backward is at least {lowest:.3f} at every "
                 "LayerNorm with either attention, and what it loses compounds over the layers and the steps in "
                 "ways one batch does not show.")
    text += (f" The attention does change the scale: σ averages {soft['sigma_mean']:.3f} (std "
             f"{soft['sigma_std']:.3f}) with softmax and {sig['sigma_mean']:.3f} (std {sig['sigma_std']:.3f}) with "
             f"sigmoid, whose unnormalised attention lets the residual stream grow, so the surrogates without 1/σ "
             f"(projected, identity) reach batch cosines of {sig['batch_cos_projected']:.3f} and "
             f"{sig['batch_cos_identity']:.3f} with sigmoid against {soft['batch_cos_projected']:.3f} and "
             f"{soft['batch_cos_identity']:.3f} with softmax.")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--fresh", action="store_true", help="delete the kept runs first")
    args = parser.parse_args()
    if args.fresh:
        for path in DATA.glob("localgpt-*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    DATA.mkdir(parents=True, exist_ok=True)
    study = layernorm_table()
    init = initial_cosines()
    logs = train_all(args.steps)
    plot(logs)
    write_atomic(PAGE, page(args.steps, study, init, logs))
    print(f"wrote {PAGE} and {PLOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
