"""Regenerate docs/results/resmlp.md: seed 004 (DFA with a residual-branch penalty on a residual MLP) with the epx
commands, on Fashion-MNIST on the CPU.

    EPX_DATA_DIR=../shared/data python docs/results/make_resmlp.py [--epochs 10] [--seeds 3] [--fresh]

Six conditions, each for every seed: dfa with λ ∈ {0, 1e-3, 1e-2, 1e-1}, backprop, and dfa with the blocks frozen
(seed 004's frozen-blocks baseline: only the embedding, by DFA, and the read-out, by its true gradient, learn).
Every run is `epx train ... --model resmlp --data fashionmnist --epochs E --ref backprop`; two run side by side (one
per core). Each run's run.json and log.jsonl are kept in docs/results/data/resmlp-*/ (a run already there is
skipped; --fresh deletes them first), and every number and the plot come from those logs. Runs on the real data
only: it stops if a run fell back to the generated sample.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from runner import train_two_at_a_time

from ep_core.files import write_atomic

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
PAGE = HERE / "resmlp.md"
PLOT = HERE / "resmlp.png"
CONDITIONS = {
    "dfa-lam0": ["dfa", "--set", "lam=0"],
    "dfa-lam1e-3": ["dfa", "--set", "lam=1e-3"],
    "dfa-lam1e-2": ["dfa", "--set", "lam=1e-2"],
    "dfa-lam1e-1": ["dfa", "--set", "lam=1e-1"],
    "backprop": ["backprop"],
    "dfa-frozen": ["dfa", "--set", "lam=0", "--freeze", "block*"],
}
LABELS = {"dfa-lam0": "DFA, λ = 0", "dfa-lam1e-3": "DFA, λ = 1e-3", "dfa-lam1e-2": "DFA, λ = 1e-2",
          "dfa-lam1e-1": "DFA, λ = 1e-1", "backprop": "backprop", "dfa-frozen": "DFA, blocks frozen"}
SEED_004_CIFAR = {"DFA (λ = 0)": 0.308, "DFA, shallow": 0.349, "DFA, blocks frozen": 0.349, "backprop": 0.609}
BLOCKS = ("block0", "block1", "block2", "block3")
BOUNDED_GROWTH = 2.0
"""A stream is bounded when no block multiplies its median norm by more than this (backprop's blocks: ~1.3)."""


def train_args(condition: str, seed: int, epochs: int) -> list[str]:
    estimator, *options = CONDITIONS[condition]
    return ["train", estimator, "--model", "resmlp", "--data", "fashionmnist", "--epochs", str(epochs), "--seed",
            str(seed), "--ref", "backprop", "--diagnose-every", "100", "--eval-every", "468", *options]


def run_all(epochs: int, seeds: int) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every (condition, seed) run, two at a time; returns each run's log records."""
    wanted = [(condition, seed) for seed in range(seeds) for condition in CONDITIONS]
    missing = {folder(*key): train_args(*key, epochs) for key in wanted
               if not (DATA / folder(*key) / "log.jsonl").exists()}

    def keep(name: str, run: Path) -> None:
        target = DATA / name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "run.json", target / "run.json")
        write_atomic(target / "log.jsonl", "".join(line + "\n" for line in kept(run / "log.jsonl")))

    train_two_at_a_time(missing, keep, prefix="epx-resmlp-")
    logs = {}
    for key in wanted:
        run = json.loads((DATA / folder(*key) / "run.json").read_text())
        if run["data"]["name"] != "fashionmnist":
            raise SystemExit(f"{folder(*key)} trained on {run['data']['name']!r}, not Fashion-MNIST")
        if run["train"]["epochs"] != epochs:
            raise SystemExit(f"{folder(*key)} ran {run['train']['epochs']} epochs, not {epochs}: use --fresh")
        logs[key] = [json.loads(line) for line in (DATA / folder(*key) / "log.jsonl").read_text().splitlines()]
    return logs


def kept(log: Path) -> list[str]:
    """The log lines the page reads: every record but the plain per-step ones, which would make the kept logs a
    hundred times larger; every 100th step stays (with its comparison to backprop, if any), sampling the step time."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [json.dumps(r) for r in records if r["kind"] != "train" or r["step"] % 100 == 0]


def folder(condition: str, seed: int) -> str:
    return f"resmlp-{condition}-s{seed}"


def epochs_of(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if r["kind"] == "epoch"]


def block_cosines(log: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    return [(r["step"], r["diagnostic"]["groups"]) for r in log if r["kind"] == "train" and "diagnostic" in r]


def mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.pstdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def mean_sci(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3g}"


def plot(logs: dict[tuple[str, int], list[dict[str, Any]]], seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, (accuracy, stream, cosine) = plt.subplots(1, 3, figsize=(15, 4.2))
    for condition in CONDITIONS:
        runs = [epochs_of(logs[(condition, seed)]) for seed in range(seeds)]
        epochs = [r["epoch"] for r in runs[0]]
        accuracy.plot(epochs, [statistics.fmean(run[i]["test_accuracy"] for run in runs) for i in range(len(epochs))],
                      marker="o", label=LABELS[condition])
        stream.plot(epochs, [statistics.fmean(run[i]["stream"]["h_L_norm"] for run in runs)
                             for i in range(len(epochs))], marker="o", label=LABELS[condition])
        if condition.startswith("dfa") and condition != "dfa-frozen":
            series = block_cosines(logs[(condition, 0)])
            cosine.plot([step for step, _ in series], [statistics.fmean(groups[b] for b in BLOCKS)
                                                       for _, groups in series], label=LABELS[condition])
    accuracy.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (mean over seeds)")
    stream.set(xlabel="epoch", ylabel="median ‖h_L‖", yscale="log", title="residual stream ‖h_L‖")
    cosine.set(xlabel="step", ylabel="mean block cosine to backprop", title="DFA's block gradients (seed 0)")
    for axis in (accuracy, stream, cosine):
        axis.grid(alpha=0.3)
    accuracy.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(PLOT, buffer.getvalue())


def page(logs: dict[tuple[str, int], list[dict[str, Any]]], epochs: int, seeds: int) -> str:
    final = {condition: [epochs_of(logs[(condition, seed)])[-1] for seed in range(seeds)] for condition in CONDITIONS}
    run0 = json.loads((DATA / folder("dfa-lam0", 0) / "run.json").read_text())
    seconds = {condition: statistics.median(r["ms"] for seed in range(seeds) for r in logs[(condition, seed)]
                                            if r["kind"] == "train") * run0["train"]["steps"] / epochs / 1000
               for condition in CONDITIONS}
    lines = [
        "# Seed 004 on Fashion-MNIST: DFA with a residual-branch penalty on a residual MLP",
        "",
        f"Generated by `EPX_DATA_DIR=../shared/data python docs/results/make_resmlp.py --epochs {epochs} --seeds "
        f"{seeds}` from the logs in `docs/results/data/resmlp-*/`. resmlp defaults (d = 256, 4 blocks, 784 inputs, "
        "10 classes), AdamW with lr 1e-3 and weight decay 0.01, cosine decay to 0 over the run, no warm-up, "
        "gradient norm clipped at 1 per parameter group, batch 128, "
        f"{epochs} epochs of {run0['train']['steps'] // epochs} steps, seeds 0 … {seeds - 1}, CPU, one thread per run.",
        "Each condition is one command:",
        "",
        "```bash",
        *[f"epx {shlex.join(train_args(condition, 0, epochs))}" for condition in CONDITIONS],
        "```",
        "",
        f"## After {epochs} epochs (mean ± std over {seeds} seeds)",
        "",
        "| condition | test accuracy | median ‖h_L‖ | median ‖∂L/∂h_2‖ | largest block growth "
        "| s per epoch (its steps) |",
        "|---|---|---|---|---|---|",
    ]
    for condition, records in final.items():
        lines.append(f"| {LABELS[condition]} | {mean_std([r['test_accuracy'] for r in records])} | "
                     f"{mean_sci([r['stream']['h_L_norm'] for r in records])} | "
                     f"{mean_sci([r['stream']['grad_norm'] for r in records])} | "
                     f"{mean_sci([r['stream']['max_growth'] for r in records])} | {seconds[condition]:.1f} |")
    lines += ["", "![test accuracy, ‖h_L‖ and DFA's block cosines over training](resmlp.png)", "",
              "## DFA's block gradients against backprop over training",
              "",
              "Cosine of each block's DFA gradient to backprop's on the training batch, every 100 steps (mean over "
              "seeds; the read-out's is 1 by construction).", "",
              "| condition | step | " + " | ".join(BLOCKS) + " | embed |", "|---|---|" + "---|" * (len(BLOCKS) + 1)]
    for condition in CONDITIONS:
        if not condition.startswith("dfa") or condition == "dfa-frozen":
            continue
        series = [block_cosines(logs[(condition, seed)]) for seed in range(seeds)]
        for index in sorted({0, len(series[0]) // 2, len(series[0]) - 1}):
            step = series[0][index][0]
            cells = [f"{statistics.fmean(s[index][1][g] for s in series):.3f}" for g in (*BLOCKS, "embed")]
            lines.append(f"| {LABELS[condition]} | {step} | " + " | ".join(cells) + " |")
    accuracy = {c: statistics.fmean(r["test_accuracy"] for r in final[c]) for c in CONDITIONS}
    stream = {c: statistics.fmean(r["stream"]["h_L_norm"] for r in final[c]) for c in CONDITIONS}
    growth = {c: statistics.fmean(r["stream"]["max_growth"] for r in final[c]) for c in CONDITIONS}
    gradient = {c: statistics.fmean(r["stream"]["grad_norm"] for r in final[c]) for c in CONDITIONS}
    lines += ["", "## Which of seed 004's outcomes the numbers support", "",
              "Seed 004 names three outcomes for a penalised DFA run: **(A)** the residual stream bounded, the "
              "backprop gradient healthy and the accuracy above the shallow baseline (here: DFA with the blocks "
              "frozen, the seed's frozen-blocks baseline, which on CIFAR-10 equals its shallow one); **(B)** bounded "
              "and healthy but not above it; **(C)** the stream stays exploded. \"Bounded\" is read as no block "
              f"growing the stream more than {BOUNDED_GROWTH:g}× (backprop's largest block growth: "
              f"{growth['backprop']:.3g}×); \"healthy\" as a median ‖∂L/∂h_2‖ within 10× of backprop's "
              f"({gradient['backprop']:.3g}).", ""]
    for condition in ("dfa-lam0", "dfa-lam1e-3", "dfa-lam1e-2", "dfa-lam1e-1"):
        bounded = growth[condition] <= BOUNDED_GROWTH
        healthy = gradient[condition] >= gradient["backprop"] / 10
        above = accuracy[condition] > accuracy["dfa-frozen"]
        outcome = ("C" if not bounded else "A" if healthy and above else "B")
        lines.append(f"- {LABELS[condition]}: largest block growth {growth[condition]:.3g}× "
                     f"({'bounded' if bounded else 'exploded'}; median ‖h_L‖ {stream[condition]:.3g}), ‖∂L/∂h_2‖ "
                     f"{gradient[condition]:.3g} ({'healthy' if healthy else 'collapsed'}), accuracy "
                     f"{accuracy[condition]:.4f} vs {accuracy['dfa-frozen']:.4f} frozen: outcome **({outcome})**.")
    penalised = [stream[c] for c in ("dfa-lam1e-3", "dfa-lam1e-2", "dfa-lam1e-1")]
    lines += ["", f"‖h_L‖ itself ends between {min(penalised):.2g} and {max(penalised):.2g} in the penalised runs, "
              "and at "
              f"{stream['dfa-frozen']:.2g} in the frozen-blocks run, whose blocks cannot grow anything (backprop: "
              f"{stream['backprop']:.2g}): under the penalty the stream's norm comes from the "
              "DFA-trained embedding (its signal has no penalty), not from the blocks, whose growth stays near 1. "
              "Without the penalty the blocks themselves explode the stream, and the backprop gradient at h_2 "
              f"collapses to {gradient['dfa-lam0']:.2g}, where any cosine to it is noise."]
    lines += ["", "## Seed 004's CIFAR-10 numbers, and the same study on CIFAR-10", "",
              "Seed 004's 3-seed means on CIFAR-10 after 100 epochs: " + ", ".join(
                  f"{name} {value:.3f}" for name, value in SEED_004_CIFAR.items()) + ".",
              "CIFAR-10 is not available offline here; where `cifar-10-binary.tar.gz` is present (or can be "
              "downloaded), the same study is:", "", "```bash"]
    for condition in CONDITIONS:
        args = train_args(condition, 0, 100)
        args[args.index("fashionmnist")] = "cifar10"
        lines.append(f"epx {shlex.join([*args, '--augment', 'true'])}")
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="delete the kept runs first")
    options = parser.parse_args()
    if options.fresh:
        for path in DATA.glob("resmlp-*"):
            shutil.rmtree(path)
    logs = run_all(options.epochs, options.seeds)
    plot(logs, options.seeds)
    write_atomic(PAGE, page(logs, options.epochs, options.seeds))
    print(f"wrote {PAGE} and {PLOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
