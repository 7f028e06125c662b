"""Milliseconds per gradient of every estimator on a model's defaults, measured in one run, reported as ratios.

    python benchmarks/cost.py [--model cet|resmlp|localgpt] [--device cpu] [--repeats 7] [--model-set k=v ...]
                              [--out FILE]

Each estimator gets one warm-up and then ``repeats`` timed runs, interleaved round-robin so that a change in
machine load affects all estimators alike; the median is reported. On cet the estimators are bptt, ep, aep and
adjoint, as ratios to ep, and it exits 3 if aep costs more than 1.5x ep; on resmlp they are backprop and dfa,
and it exits 3 if dfa costs more than 1.5x backprop; on localgpt backprop and fa (random feedback, exact
LayerNorms), and it exits 3 if fa costs more than 1.3x backprop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from ep_core.files import write_atomic
from ep_core.harness import init_state, measure
from ep_core.plugins import load
from ep_core.session import build_batch, build_estimator, build_model, load_data, parse_settings

# model: (estimators, the one the others are divided by, the one whose ratio is bounded, the bound)
PRESETS = {"cet": (("bptt", "ep", "aep", "adjoint"), "ep", "aep", 1.5),
           "resmlp": (("backprop", "dfa"), "backprop", "dfa", 1.5),
           "localgpt": (("backprop", "fa"), "backprop", "fa", 1.3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cet", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", default="auto")
    parser.add_argument("--model-set", action="append", default=[])
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (as the CLI's --threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    registry = load()
    names, base, checked, limit = PRESETS[args.model]
    spec = registry.get("model", args.model).factory.data
    data = load_data(registry, args.data, spec=spec, warn=lambda m: print(m, file=sys.stderr))
    model = build_model(registry, args.model, parse_settings(args.model_set, "--model-set"), device=args.device,
                        dataset=data)
    batch = build_batch(model, data).batch
    estimators = {name: build_estimator(registry, name) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for estimator in estimators.values():  # state, then a warm-up
        init_state(estimator, model, seed=0)
        measure(estimator, model, batch, seed=0, repeats=1)
    for _ in range(args.repeats):
        for name, estimator in estimators.items():
            times[name] += measure(estimator, model, batch, seed=0, repeats=1, warmup=0).ms
    median = {name: statistics.median(ms) for name, ms in times.items()}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{args.model} {model.config.to_dict()} on {device}, torch threads {torch.get_num_threads()}")
    print(f"{'estimator':>10} {'ms/grad':>9} {'x ' + base:>10}")
    for name in names:
        print(f"{name:>10} {median[name]:>9.1f} {median[name] / median[base]:>10.2f}")
    ratio = median[checked] / median[base]
    verdict = "ok" if ratio <= limit else "FAIL"
    print(f"{checked} / {base} = {ratio:.2f} (limit {limit}): {verdict}")
    if args.out:
        write_atomic(args.out, json.dumps({"model": args.model, "device": device, "median_ms": median, "ms": times,
                                           f"{checked}_over_{base}": ratio}, indent=2))
    return 0 if ratio <= limit else 3


if __name__ == "__main__":
    sys.exit(main())
