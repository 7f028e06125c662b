"""Milliseconds per gradient of every estimator on cet, measured in one run, reported as ratios to ep.

    python benchmarks/cost.py [--device cpu] [--repeats 7] [--model-set k=v ...] [--out FILE]

Each estimator gets one warm-up and then ``repeats`` timed runs, interleaved round-robin so that a change in
machine load affects all estimators alike; the median is reported. Exits 3 if aep costs more than 1.5x ep.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from ep_core.files import write_atomic
from ep_core.harness import measure
from ep_core.plugins import load
from ep_core.session import build_batch, build_estimator, build_model, load_data, parse_settings

ESTIMATORS = ("bptt", "ep", "aep", "adjoint")
AEP_OVER_EP_LIMIT = 1.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", default="auto")
    parser.add_argument("--model-set", action="append", default=[])
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (as the CLI's --threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    registry = load()
    model = build_model(registry, "cet", parse_settings(args.model_set, "--model-set"), device=args.device)
    images = load_data(registry, args.data, spec=model.data, warn=lambda m: print(m, file=sys.stderr))
    batch = build_batch(model, images).batch
    estimators = {name: build_estimator(registry, name) for name in ESTIMATORS}
    times: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for estimator in estimators.values():  # warm-up
        measure(estimator, model, batch, seed=0, repeats=1)
    for _ in range(args.repeats):
        for name, estimator in estimators.items():
            times[name] += measure(estimator, model, batch, seed=0, repeats=1, warmup=0).ms
    median = {name: statistics.median(ms) for name, ms in times.items()}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"cet {model.config.to_dict()} on {device}, torch threads {torch.get_num_threads()}")
    print(f"{'estimator':>10} {'ms/grad':>9} {'x ep':>6}")
    for name in ESTIMATORS:
        print(f"{name:>10} {median[name]:>9.1f} {median[name] / median['ep']:>6.2f}")
    ratio = median["aep"] / median["ep"]
    verdict = "ok" if ratio <= AEP_OVER_EP_LIMIT else "FAIL"
    print(f"aep / ep = {ratio:.2f} (limit {AEP_OVER_EP_LIMIT}): {verdict}")
    if args.out:
        write_atomic(args.out, json.dumps({"device": device, "median_ms": median, "ms": times,
                                           "aep_over_ep": ratio}, indent=2))
    return 0 if ratio <= AEP_OVER_EP_LIMIT else 3


if __name__ == "__main__":
    sys.exit(main())
