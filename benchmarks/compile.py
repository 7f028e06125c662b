"""Whether a compiled relaxation step pays inside a CUDA graph, on lm and cet defaults, in one process.

    EPX_DATA_DIR=../shared/data python benchmarks/compile.py --device cuda [--steps 162] [--repeats 20] [--out FILE]

epx records an estimate's steps as they run eagerly (`ep_core.capture`), one CUDA graph node per kernel. A step
compiled by torch.compile (inductor, default mode: it makes no graphs of its own) fuses the step's elementwise
work into fewer kernels. For each model (seed 0, float32, the comparison's batch): ``steps`` free-phase steps
x ← Π(x + εF(x)) from init_state (162: lm's ep at seed 002's settings, T1 + 2·T2 + 2), recorded as one CUDA
graph with the step as epx runs it and with the step compiled (compiled and warmed up before recording), the
median ms of a replay of each, timed by turns, their ratio, and the relative distance between the two end
states. The compile time of the step is reported too. Exit 3 if the end states differ by more than 1e-5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ep_core.capture import with_parameter_terms
from ep_core.files import write_atomic
from ep_core.harness import environment
from ep_core.plugins import load
from ep_core.relax import norm, step, sub
from ep_core.session import build_problem

TOL = 1e-5


def recorded(steps: int, advance: Callable, start, device: torch.device) -> tuple[Callable[[], None], list]:
    """A CUDA graph of ``steps`` applications of ``advance`` from ``start`` (a static copy), after a warm-up on a side
    stream; returns the replay and the graph's end state."""
    state = [tuple(t.clone() for t in start)]

    def work() -> None:
        x = state[0]
        for _ in range(steps):
            x = advance(x)
        state.append(x)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return graph.replay, state


def replay_ms(replays: list[Callable[[], None]], device: torch.device, repeats: int) -> list[float]:
    for replay in replays:
        replay()
    spent: list[list[float]] = [[] for _ in replays]
    for _ in range(repeats):
        for replay, times in zip(replays, spent):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            replay()
            torch.cuda.synchronize(device)
            times.append(1000 * (time.perf_counter() - start))
    return [statistics.median(times) for times in spent]


def measure(registry, name: str, device: torch.device, steps: int, repeats: int) -> dict:
    problem = build_problem(registry, name, device=str(device), warn=lambda m: print(m, file=sys.stderr))
    model = problem.model
    with torch.no_grad():
        terms = with_parameter_terms(model, problem.batch().batch)
        terms = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in terms.items()}
        start = model.init_state(terms)

        def advance(x):
            return step(model, terms, x, model.force(x, terms))

        compiled = torch.compile(advance)
        began = time.perf_counter()
        compiled(start)
        torch.cuda.synchronize(device)
        compile_s = time.perf_counter() - began
        eager_replay, eager_state = recorded(steps, advance, start, device)
        compiled_replay, compiled_state = recorded(steps, compiled, start, device)
        eager_ms, compiled_ms = replay_ms([eager_replay, compiled_replay], device, repeats)
        distance = float(norm(sub(compiled_state[-1], eager_state[-1])) / norm(eager_state[-1]))
    return {"steps": steps, "eager_graph_ms": eager_ms, "compiled_graph_ms": compiled_ms,
            "ratio": compiled_ms / eager_ms, "end_state_distance": distance, "compile_s": compile_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=162)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("error: this benchmark records CUDA graphs; run it with --device cuda on a machine with a GPU",
              file=sys.stderr)
        return 2
    registry = load()
    report = {"environment": environment(), "device": torch.cuda.get_device_name(device), "models": {}}
    ok = True
    for name in ("lm", "cet"):
        row = report["models"][name] = measure(registry, name, device, args.steps, args.repeats)
        ok &= row["end_state_distance"] <= TOL
        print(f"{name}: {row['steps']} steps in one CUDA graph: eager ops {row['eager_graph_ms']:.3f} ms, compiled "
              f"step {row['compiled_graph_ms']:.3f} ms ({row['ratio']:.2f}x; compiled in {row['compile_s']:.1f} s); "
              f"end states {row['end_state_distance']:.1e} apart")
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=2))
    print("ok" if ok else "FAIL")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
