"""Peak GPU memory per gradient at two free-phase lengths, eager and captured: estimators that never keep a graph
of the free phase (ep, aep, adjoint) should not grow with T1, while bptt stores every step.

    python benchmarks/memory.py --device cuda [--short 100] [--long 1000]

Peak memory is torch.cuda.max_memory_allocated during one estimate, minus what was allocated before it; for a
captured estimate (ep_core.capture), the high-water mark of the CUDA graph's memory pool while it was recorded.
Exits 3 if ep, aep or adjoint grows by more than 1.2x from the short to the long run in either mode.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ep_core.files import write_atomic
from ep_core.harness import measure
from ep_core.plugins import load
from ep_core.session import build_batch, build_estimator, build_model, load_data

CONSTANT_MEMORY = ("ep", "aep", "adjoint")
ESTIMATORS = (*CONSTANT_MEMORY, "bptt")
GROWTH_LIMIT = 1.2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--short", type=int, default=100)
    parser.add_argument("--long", type=int, default=1000)
    parser.add_argument("--data", default="auto")
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (as the CLI's --threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        print("peak memory is measured with CUDA's allocator; no CUDA device here", file=sys.stderr)
        return 2

    registry = load()
    modes = ("eager", "captured")
    peaks: dict[str, dict[str, dict[int, int]]] = {mode: {name: {} for name in ESTIMATORS} for mode in modes}
    ms: dict[str, dict[str, dict[int, float]]] = {mode: {name: {} for name in ESTIMATORS} for mode in modes}
    images = load_data(registry, args.data, spec=registry.get("model", "cet").factory.data,
                       warn=lambda m: print(m, file=sys.stderr))
    for steps in (args.short, args.long):
        model = build_model(registry, "cet", {"T1": steps}, device=args.device)
        batch = build_batch(model, images).batch
        for mode in modes:
            for name in ESTIMATORS:
                measured = measure(build_estimator(registry, name), model, batch, seed=0, repeats=1,
                                   eager=mode == "eager")
                peaks[mode][name][steps] = measured.peak_memory_bytes
                ms[mode][name][steps] = measured.ms[0]
    print(f"cet defaults on {torch.cuda.get_device_name()}, peak memory per gradient")
    print(f"{'mode':>9} {'estimator':>10} {'T1=' + str(args.short):>12} {'T1=' + str(args.long):>12} "
          f"{'growth':>7} {'ms@short':>9} {'ms@long':>9}")
    failed = []
    for mode in modes:
        for name in ESTIMATORS:
            short, long = peaks[mode][name][args.short], peaks[mode][name][args.long]
            growth = long / short
            print(f"{mode:>9} {name:>10} {short / 2**20:>9.1f} MiB {long / 2**20:>9.1f} MiB {growth:>6.2f}x "
                  f"{ms[mode][name][args.short]:>9.1f} {ms[mode][name][args.long]:>9.1f}")
            if name in CONSTANT_MEMORY and growth > GROWTH_LIMIT:
                failed.append(f"{name} ({mode})")
    print("constant-memory estimators within 1.2x: " + ("FAIL " + ", ".join(failed) if failed else "ok"))
    if args.out:
        write_atomic(args.out, json.dumps({"device": torch.cuda.get_device_name(), "peak_bytes": peaks, "ms": ms},
                                          indent=2))
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
