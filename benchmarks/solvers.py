"""Anderson acceleration against the plain iteration (ep_core.solvers), on lm and cet defaults, in one process.

    EPX_DATA_DIR=../shared/data python benchmarks/solvers.py [--repeats 5] [--out FILE]

For each model, in float64 at tol 1e-10: the free phase's distance to 2000 plain steps, the force evaluations
Anderson used and the plain steps needed to reach the same residual (‖G(x) − x‖ relative to the distance from
the start), and the relative error of ep's and aep's gradients (β = 1e-3, at convergence: T2 = 2000 plain
steps, or Anderson at tol 1e-10) to the plain ones. Then, on lm in float32, the median wall time of one aep
gradient with solver=anderson (tol 1e-6) against the plain T1 = 120, T2 = 20, timed interleaved (one warm-up
each), and each one's relative error to aep's gradient at convergence (float64, Anderson at tol 1e-10, same
parameters and batch), with the resolution float32 has for the nudged displacement, ε₃₂·‖x*‖ / ‖x⁺ − x*‖: a
tolerance below it cannot be reached; and the plain run (T1 = 120) with the smallest T2 of 40, 80, ..., 640 whose
gradient is as close to the converged one as Anderson's, timed with them: the cost of the same accuracy; and the
evaluations Anderson's two nudged phases need to reach tol 1e-3 ... 1e-6 when T2 does not bound them (T2 = 2000),
against the 2 × 20 the plain run spends, and what a plain nudged step costs in free steps (the plain aep's
time less its free phase's, per nudged step): where a nudged step costs more than a free one and Anderson's
nudged phases need 40 or more evaluations, they alone cost half the plain run or more. Exits 3
unless the distance is at most 1e-8, Anderson needs at least 3× fewer evaluations, the gradients agree to 1e-6
and the anderson aep costs at most half the plain one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ep_core.capture import with_parameter_terms
from ep_core.files import write_atomic
from ep_core.harness import gradient_metrics, measure
from ep_core.plugins import load
from ep_core.relax import free_phase, norm, nudge, relax, relaxation_map, sub
from ep_core.session import build_batch, build_estimator, build_model, load_data


def plain_steps_to(model, batch, tol: float, limit: int = 20000) -> int | None:
    G = relaxation_map(model, batch)
    with torch.no_grad():
        start = x = model.init_state(batch)
        for k in range(1, limit + 1):
            image = G(x)
            if float(norm(sub(image, x)) / norm(sub(image, start))) <= tol:
                return k
            x = image
    return None


def converged(registry, data, batch, beta: float):
    """aep's gradient at convergence (float64, Anderson at tol 1e-10) for the float32 models' parameters (build_model
    draws them in float32 either way), and ε₃₂·‖x*‖ / ‖x⁺ − x*‖ (x⁺ from ep's nudge, for its size)."""
    model = build_model(registry, "lm", {"T1": "2000", "solver": "anderson", "tol": "1e-10"}, dtype=torch.float64,
                        dataset=data)
    exact = build_estimator(registry, "aep", {"beta": str(beta), "T2": "2000"}).estimate(
        model, batch, generator=torch.Generator())
    x_star = exact.equilibrium.state
    plus = relax(model, batch, x_star, 2000, phase="nudged", field=nudge(model, batch, beta))
    return exact, torch.finfo(torch.float32).eps * float(norm(x_star) / norm(sub(plus.state, x_star)))


def nudged_evaluations_needed(registry, data, batch) -> dict[str, dict[str, int]]:
    """For lm in float32 with solver=anderson at tol 1e-3 ... 1e-6: the free phase's evaluations and those of
    aep's two nudged phases with T2 = 2000 (evaluations of −∇E alone, one per nudged step of the gradient form),
    so that the tolerance, not T2, stops them."""
    needed = {}
    for tol in ("1e-3", "1e-4", "1e-5", "1e-6"):
        model = build_model(registry, "lm", {"solver": "anderson", "tol": tol}, dataset=data)
        run = measure(build_estimator(registry, "aep", {"T2": "2000"}), model, batch, seed=0, repeats=1, warmup=0)
        needed[tol] = {"free": run.estimate.equilibrium.steps, "nudged": run.calls["conservative"]}
    return needed


def float32_wall_time(registry, repeats: int) -> dict:
    """lm in float32: aep with solver=anderson (tol 1e-6) against the plain T1 = 120, T2 = 20, and against the
    plain run with the smallest T2 of 40, 80, ..., 640 whose gradient is as close to the converged one; timed
    interleaved after one warm-up each."""
    spec = registry.get("model", "lm").factory.data
    data = load_data(registry, "auto", spec=spec, shape=spec.sample_shape(registry.get("model", "lm").factory.Config()))
    plain = build_model(registry, "lm", dataset=data)
    batch = build_batch(plain, data).batch
    aep = build_estimator(registry, "aep")
    exact, resolution = converged(registry, data, batch, aep.config.beta)

    def error(estimator, model) -> float:
        estimate = measure(estimator, model, batch, seed=0, repeats=1).estimate
        return gradient_metrics(estimate.grads, exact.grads, model.parameter_groups())["rel_error"]
    runs = {"plain": (aep, plain),
            "anderson": (aep, build_model(registry, "lm", {"solver": "anderson", "tol": "1e-6"}, dataset=data))}
    errors = {key: error(*run) for key, run in runs.items()}
    matched = None
    for T2 in (40, 80, 160, 320, 640):
        longer = build_estimator(registry, "aep", {"T2": str(T2)})
        if (reached := error(longer, plain)) <= errors["anderson"]:
            matched = {"T2": T2, "rel_error": reached}
            runs["plain_same_error"] = (longer, plain)
            break
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, (estimator, model) in runs.items():
            times[key] += measure(estimator, model, batch, seed=0, repeats=1, warmup=0).ms
    median = {key: statistics.median(ms) for key, ms in times.items()}
    free_ms, prepared = [], with_parameter_terms(plain, batch)   # as an estimate runs its phases
    for _ in range(repeats):
        start = time.perf_counter()
        free_phase(plain, prepared)
        free_ms.append((time.perf_counter() - start) * 1e3)
    free_step = statistics.median(free_ms) / plain.dynamics.T1
    nudged_step = (median["plain"] - statistics.median(free_ms)) / (2 * aep.config.T2)
    return {"median": median, "ms": times, "ratio": median["anderson"] / median["plain"],
            "nudged_step_over_free_step": nudged_step / free_step,
            "nudged_evals_unbounded": nudged_evaluations_needed(registry, data, batch),
            "rel_error_to_converged": errors, "plain_same_error": matched,
            "ratio_at_same_error": median["anderson"] / median["plain_same_error"] if matched else None,
            "float32_resolution_of_displacement": resolution}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    registry = load()
    report: dict = {}
    ok = True
    for name in ("lm", "cet"):
        spec = registry.get("model", name).factory.data
        data = load_data(registry, "auto", spec=spec, warn=lambda m: print(m, file=sys.stderr),
                         shape=spec.sample_shape(registry.get("model", name).factory.Config()))
        plain = build_model(registry, name, {"T1": "2000"}, dtype=torch.float64, dataset=data)
        fast = build_model(registry, name, {"T1": "2000", "solver": "anderson", "tol": "1e-10"},
                           dtype=torch.float64, dataset=data)
        batch = build_batch(plain, data).batch
        reference, accelerated = free_phase(plain, batch), free_phase(fast, batch)
        distance = float(norm(sub(accelerated.state, reference.state)) / norm(reference.state))
        needed = plain_steps_to(plain, batch, 1e-10)
        row = {"distance": distance, "anderson_evals": accelerated.steps, "plain_steps_to_tol": needed,
               "data": data.name}
        for estimator in ("ep", "aep"):
            settings = {"beta": "1e-3", "T2": "2000"}
            exact = build_estimator(registry, estimator, settings).estimate(plain, batch, generator=torch.Generator())
            measured = measure(build_estimator(registry, estimator, settings), fast, batch, seed=0, repeats=1)
            row[f"{estimator}_rel_error"] = gradient_metrics(measured.estimate.grads, exact.grads,
                                                             plain.parameter_groups())["rel_error"]
            row[f"{estimator}_anderson_force_evals"] = measured.calls["force"]
            row[f"{estimator}_anderson_conservative_evals"] = measured.calls.get("conservative", 0)
        report[name] = row
        fewer = needed is not None and needed >= 3 * accelerated.steps
        ok &= distance <= 1e-8 and fewer and row["ep_rel_error"] <= 1e-6 and row["aep_rel_error"] <= 1e-6
        print(f"{name} ({data.name}), float64, tol 1e-10: distance to 2000 plain steps {distance:.2e}; Anderson "
              f"{accelerated.steps} evaluations, plain {needed} steps to the same residual; gradient rel error "
              f"ep {row['ep_rel_error']:.2e} ({row['ep_anderson_force_evals']} force evals), aep "
              f"{row['aep_rel_error']:.2e} ({row['aep_anderson_force_evals']} force evals, "
              f"{row['aep_anderson_conservative_evals']} of −∇E alone)")

    timing = report["lm_float32_aep_ms"] = float32_wall_time(registry, args.repeats)
    median, errors, matched = timing["median"], timing["rel_error_to_converged"], timing["plain_same_error"]
    ok &= timing["ratio"] <= 0.5
    print(f"lm float32 aep: plain (T1=120, T2=20) {median['plain']:.1f} ms, anderson (tol 1e-6) "
          f"{median['anderson']:.1f} ms: {timing['ratio']:.2f}x (limit 0.5); rel error to the converged gradient: "
          f"plain {errors['plain']:.2e}, anderson {errors['anderson']:.2e}; float32 resolves the nudged displacement "
          f"to {timing['float32_resolution_of_displacement']:.1e}")
    needed = ", ".join(f"tol {tol}: {n['free']} + {n['nudged']}" for tol, n in timing["nudged_evals_unbounded"].items())
    print(f"  anderson's free + nudged evaluations without the T2 bound (plain: 120 + 2 x 20): {needed}; a nudged "
          f"step costs {timing['nudged_step_over_free_step']:.2f} free steps")
    if matched:
        print(f"  plain as close to it needs T2 = {matched['T2']} (rel error {matched['rel_error']:.2e}): "
              f"{median['plain_same_error']:.1f} ms, anderson {timing['ratio_at_same_error']:.2f}x of it")
    else:
        print("  no plain run up to T2 = 640 is as close to the converged gradient as anderson")
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=2))
    print("ok" if ok else "FAIL")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
