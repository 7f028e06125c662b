"""Anderson acceleration against the plain iteration (ep_core.solvers), on lm and cet defaults, in one process.

    EPX_DATA_DIR=../shared/data python benchmarks/solvers.py [--repeats 5] [--out FILE]

For each model, in float64 at tol 1e-10: the free phase's distance to 2000 plain steps, the force evaluations
Anderson used and the plain steps needed to reach the same residual (‖G(x) − x‖ relative to the distance from
the start), and the relative error of ep's and aep's gradients (β = 1e-3, at convergence: T2 = 2000 plain
steps, or Anderson at tol 1e-10) to the plain ones. Then, on lm in float32, the median wall time of one aep
gradient with solver=anderson (tol 1e-6) against the plain T1 = 120, T2 = 20, timed interleaved (one warm-up
each), and each one's relative error to aep's gradient at convergence (float64, Anderson at tol 1e-10, same
parameters and batch), with the resolution float32 has for the nudged displacement, ε₃₂·‖x*‖ / ‖x⁺ − x*‖: a
tolerance below it cannot be reached. Exits 3 unless the distance is at most 1e-8, Anderson needs at least 3×
fewer evaluations, the gradients agree to 1e-6 and the anderson aep costs at most half the plain one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

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


def converged_errors(registry, data, aep, models, batch) -> tuple[dict[str, float], float]:
    """({solver: rel error of its float32 aep gradient to aep's at convergence}, ε₃₂·‖x*‖ / ‖x⁺ − x*‖), the
    converged model the float32 ones cast to float64 (build_model draws the parameters in float32 either way);
    x⁺ from ep's nudge, for its size."""
    converged = build_model(registry, "lm", {"T1": "2000", "solver": "anderson", "tol": "1e-10"},
                            dtype=torch.float64, dataset=data)
    exact = build_estimator(registry, "aep", {"beta": str(aep.config.beta), "T2": "2000"}).estimate(
        converged, batch, generator=torch.Generator())
    errors = {}
    for key, model in models.items():
        estimate = measure(aep, model, batch, seed=0, repeats=1).estimate
        errors[key] = gradient_metrics(estimate.grads, exact.grads, model.parameter_groups())["rel_error"]
    x_star = exact.equilibrium.state
    plus = relax(converged, batch, x_star, 2000, phase="nudged", field=nudge(converged, batch, aep.config.beta))
    resolution = torch.finfo(torch.float32).eps * float(norm(x_star) / norm(sub(plus.state, x_star)))
    return errors, resolution


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
        report[name] = row
        fewer = needed is not None and needed >= 3 * accelerated.steps
        ok &= distance <= 1e-8 and fewer and row["ep_rel_error"] <= 1e-6 and row["aep_rel_error"] <= 1e-6
        print(f"{name} ({data.name}), float64, tol 1e-10: distance to 2000 plain steps {distance:.2e}; Anderson "
              f"{accelerated.steps} evaluations, plain {needed} steps to the same residual; gradient rel error "
              f"ep {row['ep_rel_error']:.2e} ({row['ep_anderson_force_evals']} force evals), aep "
              f"{row['aep_rel_error']:.2e} ({row['aep_anderson_force_evals']} force evals)")

    spec = registry.get("model", "lm").factory.data
    data = load_data(registry, "auto", spec=spec, shape=spec.sample_shape(registry.get("model", "lm").factory.Config()))
    models = {"plain": build_model(registry, "lm", dataset=data),
              "anderson": build_model(registry, "lm", {"solver": "anderson", "tol": "1e-6"}, dataset=data)}
    batch = build_batch(models["plain"], data).batch
    aep = build_estimator(registry, "aep")
    times: dict[str, list[float]] = {key: [] for key in models}
    for model in models.values():
        measure(aep, model, batch, seed=0, repeats=1)
    for _ in range(args.repeats):
        for key, model in models.items():
            times[key] += measure(aep, model, batch, seed=0, repeats=1, warmup=0).ms
    median = {key: statistics.median(ms) for key, ms in times.items()}
    ratio = median["anderson"] / median["plain"]
    ok &= ratio <= 0.5
    errors, resolution = converged_errors(registry, data, aep, models, batch)
    report["lm_float32_aep_ms"] = {"median": median, "ms": times, "ratio": ratio, "rel_error_to_converged": errors,
                                   "float32_resolution_of_displacement": resolution}
    print(f"lm float32 aep: plain (T1=120, T2=20) {median['plain']:.1f} ms, anderson (tol 1e-6) "
          f"{median['anderson']:.1f} ms: {ratio:.2f}x (limit 0.5); rel error to the converged gradient: plain "
          f"{errors['plain']:.2e}, anderson {errors['anderson']:.2e}; float32 resolves the nudged displacement to "
          f"{resolution:.1e}")
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=2))
    print("ok" if ok else "FAIL")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
