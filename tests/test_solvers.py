"""The fixed-point solvers (ep_core.solvers): Anderson acceleration reaches the plain iteration's fixed point in
fewer force evaluations, gives the same EP gradients there, reports divergence, and leaves bptt alone."""

from __future__ import annotations

import pytest
import torch
from epx_estimators.aep import AEP, AEPConfig
from epx_estimators.ep import EP, EPConfig

from ep_core.bptt import BPTT
from ep_core.harness import counting, gradient_metrics
from ep_core.models.toy import Toy, ToyConfig
from ep_core.protocols import DivergenceError
from ep_core import solvers
from ep_core.relax import free_phase, norm, relaxation_map, sub
from ep_core.solvers import anderson


def toy(seed: int = 0, **settings) -> tuple[Toy, dict]:
    model = Toy(ToyConfig(conservative=False, coupling=0.7, **settings),
                generator=torch.Generator().manual_seed(seed)).double()
    return model, model.make_batch(4, generator=torch.Generator().manual_seed(seed + 1))


def plain_steps_to(model, batch, tol: float) -> int:
    """Plain steps until ‖G(x) − x‖ is at most tol times the distance travelled (Anderson's criterion)."""
    G = relaxation_map(model, batch)
    with torch.no_grad():
        start = x = model.init_state(batch)
        for k in range(1, 100_000):
            image = G(x)
            if float(norm(sub(image, x)) / norm(sub(image, start))) <= tol:
                return k
            x = image
    raise AssertionError("the plain iteration did not converge")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anderson_reaches_the_plain_fixed_point_in_a_third_of_the_evaluations(seed):
    """A history of 8 covers the toy's 6 units: Anderson is then GMRES-like on the linearised map (measured over
    seeds 0–3: 15–21 evaluations against 102–131 plain steps; with the default 5, 29–43)."""
    plain_model, batch = toy(seed, T1=2000)
    fast_model, _ = toy(seed, T1=2000, solver="anderson", tol=1e-12, memory=8)
    reference = free_phase(plain_model, batch)
    with counting(fast_model) as calls:
        accelerated = free_phase(fast_model, batch)
    distance = float(norm(sub(accelerated.state, reference.state)) / norm(reference.state))
    assert distance <= 1e-10 and accelerated.residual <= 1e-11
    needed = plain_steps_to(plain_model, batch, 1e-12)
    assert accelerated.steps * 3 <= needed, (accelerated.steps, needed)
    assert calls["force"] == accelerated.steps + 1  # its evaluations and the residual's


@pytest.mark.parametrize("estimator", [EP(EPConfig(beta=1e-3, T2=2000)), AEP(AEPConfig(beta=1e-3, T2=2000))])
def test_ep_and_aep_gradients_with_anderson_equal_the_converged_plain_ones(estimator):
    plain_model, batch = toy(3, T1=2000)
    fast_model, _ = toy(3, T1=2000, solver="anderson", tol=1e-12)
    plain = estimator.estimate(plain_model, batch, generator=torch.Generator()).grads
    fast = estimator.estimate(fast_model, batch, generator=torch.Generator()).grads
    assert gradient_metrics(fast, plain, plain_model.parameter_groups())["rel_error"] <= 1e-6


def test_bptt_differentiates_the_plain_unrolled_map_whatever_the_solver():
    plain_model, batch = toy(4, T1=50)
    fast_model, _ = toy(4, T1=50, solver="anderson")
    plain = BPTT().estimate(plain_model, batch, generator=torch.Generator())
    fast = BPTT().estimate(fast_model, batch, generator=torch.Generator())
    assert all(torch.equal(plain.grads[n], fast.grads[n]) for n in plain.grads)
    assert fast.equilibrium.steps == 50


def test_anderson_names_the_evaluation_where_it_diverges():
    model, batch = toy(5, eps=1e200, T1=300, solver="anderson")
    with pytest.raises(DivergenceError) as info:
        free_phase(model, batch)
    assert info.value.phase == "free" and 1 <= info.value.step <= 300
    # The images up to that evaluation are finite, and that one is not.
    G = relaxation_map(model, batch)
    images = []

    def watched(state):
        images.append(G(state))
        return images[-1]

    with torch.no_grad(), pytest.raises(DivergenceError):
        anderson(watched, model.init_state(batch), 300, tol=1e-6, memory=5,
                 diverged=lambda k: (_ for _ in ()).throw(DivergenceError("free", k, 1e200, "")))
    assert len(images) == info.value.step
    assert all(bool(torch.isfinite(x[0]).all()) for x in images[:-1]) and not bool(torch.isfinite(images[-1][0]).all())


def test_anderson_stops_at_the_rounding_floor_instead_of_spending_its_budget():
    """A tolerance below what float64 can reach: it returns the best iterate once the residual stops falling."""
    model, batch = toy(6, T1=5000, solver="anderson", tol=1e-30)
    equilibrium = free_phase(model, batch)
    assert equilibrium.steps < 500 and equilibrium.residual < 1e-12


def test_the_comparison_records_the_solver_and_the_evaluations_it_used():
    from ep_core.harness import compare

    model, batch = toy(7, T1=400, solver="anderson", tol=1e-10)
    comparison = compare([("ep", EP(EPConfig(T2=400)))], model, batch, reference=("bptt", BPTT()), repeats=1)
    rows = {r.label: r for r in comparison.results}
    assert rows["bptt"].stats["T1"] == 400            # bptt unrolls the plain map, all of it
    assert rows["ep"].stats["T1"] < 100               # ep's free phase stopped at the tolerance
    assert rows["ep"].force_evals < rows["bptt"].force_evals
    assert model.config.to_dict()["solver"] == "anderson"


def test_the_comparison_says_which_phases_stopped_before_their_tolerance():
    """Each phase of a solver with a tolerance is recorded with its evaluations and whether it reached tol: a T2
    too short for tol 1e-10 leaves both nudged phases on their bound, a long one lets them converge; the plain
    solver, which has no tolerance, records nothing."""
    from ep_core.harness import compare

    model, batch = toy(8, T1=400, solver="anderson", tol=1e-10)
    phases = {}
    for T2 in (3, 400):
        comparison = compare([("ep", EP(EPConfig(beta=1e-3, T2=T2)))], model, batch, reference=("bptt", BPTT()),
                             repeats=1)
        phases[T2] = comparison.result("ep").stats["phases"]
    assert [p["phase"] for p in phases[3]] == ["free", "nudged", "nudged"]
    assert phases[3][0]["converged"] is True and phases[3][0]["evaluations"] < 100
    assert [(p["evaluations"], p["converged"]) for p in phases[3][1:]] == [(3, False), (3, False)]
    assert all(p["converged"] is True and 3 < p["evaluations"] < 400 for p in phases[400][1:])
    plain_model, _ = toy(8, T1=400)
    comparison = compare([("ep", EP(EPConfig(T2=3)))], plain_model, batch, reference=("bptt", BPTT()), repeats=1)
    assert "phases" not in comparison.result("ep").stats


def contraction(units: int = 64, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, b, x*) of the linear contraction x ↦ Ax + b, A symmetric with eigenvalues 0.2 … 0.95, in float64."""
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(units, units, generator=generator, dtype=torch.float64))
    A = (rotation * torch.linspace(0.2, 0.95, units, dtype=torch.float64)) @ rotation.T
    b = torch.randn(batch, units, generator=generator, dtype=torch.float64)
    return A, b, torch.linalg.solve(torch.eye(units, dtype=torch.float64) - A, b.T).T


def never(k):
    raise AssertionError(f"diverged at {k}")


def test_anderson_stops_at_the_resolution_of_the_state():
    """A tolerance below float32's rounding: Anderson stops, converged, once ‖U(x) − x‖ is within one rounding of the
    state (ε₃₂·‖U(x)‖), at the fixed point to float32 accuracy, and reports the residual it reached."""
    A, b, exact = contraction()
    solved = anderson(lambda s: (s[0] @ A.float().T + b.float(),), (torch.zeros(8, 64),), 5000, tol=1e-30,
                      memory=5, diverged=never)
    assert solved.converged and solved.evaluations <= 60
    # From x₀ = 0 the distance travelled is ‖U(x)‖ itself, so the residual that stopped it is at most ε₃₂.
    assert 1e-30 < solved.residual <= torch.finfo(torch.float32).eps
    x = solved.state[0].double()
    assert float(torch.linalg.vector_norm(x - exact) / torch.linalg.vector_norm(exact)) < 2e-6


def test_anderson_stops_once_its_residual_no_longer_halves():
    """An update whose every evaluation is off by a relative 1e-7 (a stand-in for rounding it cannot get below,
    far above float64's): the residual stalls near there, and Anderson stops, not converged, once its smallest
    residual has not halved in 10·memory evaluations, with the best iterate it saw."""
    A, b, exact = contraction()
    noise = torch.Generator().manual_seed(1)

    def noisy(state):
        image = state[0] @ A.T + b
        return (image * (1 + 1e-7 * torch.randn(image.shape, generator=noise, dtype=image.dtype)),)

    solved = anderson(noisy, (torch.zeros(8, 64, dtype=torch.float64),), 5000, tol=1e-30, memory=5, diverged=never)
    assert not solved.converged and solved.evaluations <= 150
    assert 1e-8 < solved.residual < 1e-5
    assert float(torch.linalg.vector_norm(solved.state[0] - exact) / torch.linalg.vector_norm(exact)) < 1e-5


def test_anderson_steps_by_the_length_its_first_secant_asks_for():
    """On x ↦ ρx + c the residual is f = (ρ − 1)(x − x*): the first difference gives b = 1/(1 − ρ) = 5 (inside
    MIXING_LIMIT), and the step x + b·f lands on x* = 5c, so the third evaluation finds the fixed point (the plain
    iteration needs 56 steps for 1e-6 at ρ = 0.8)."""
    c = torch.randn(4, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solved = anderson(lambda s: (0.8 * s[0] + c,), (torch.zeros(4, 16, dtype=torch.float64),), 100, tol=1e-12,
                      memory=5, diverged=never)
    assert solved.converged and solved.evaluations == 3
    assert torch.allclose(solved.state[0], 5 * c, rtol=1e-12)


def test_anderson_falls_back_to_the_plain_step_length_when_the_secants_one_stops_converging(monkeypatch):
    """x ↦ x + ε(Ax + c) with half of A's eigenvalues soft (−0.1) and half stiff (−12 … −8), started along the soft
    half: the first secant asks for b ≈ 3, under which the plain step's stable stiff modes (1 + ε·λ ≥ −0.2) turn
    unstable (1 + b·ε·λ ≈ −2.6) and the residual creeps (still 5e-4 after 60 evaluations; stopped by the stall
    rule at 186, not converged). Once its smallest residual has not halved in SECANT_PATIENCE·m evaluations,
    Anderson starts again from its best point with b = 1, and converges."""
    generator = torch.Generator().manual_seed(3)
    units = 64
    rotation, _ = torch.linalg.qr(torch.randn(units, units, generator=generator, dtype=torch.float64))
    eigenvalues = torch.cat([torch.full((32,), -0.1), torch.linspace(-12, -8, 32)]).double()
    A = (rotation * eigenvalues) @ rotation.T
    exact = torch.randn(4, units, generator=generator, dtype=torch.float64)
    c = -(exact @ A.T)
    start = (exact + torch.randn(4, 32, generator=generator, dtype=torch.float64) @ rotation[:, :32].T
             + 1e-3 * torch.randn(4, 32, generator=generator, dtype=torch.float64) @ rotation[:, 32:].T)

    def solve():
        return anderson(lambda s: (s[0] + 0.1 * (s[0] @ A.T + c),), (start,), 500, tol=1e-10, memory=3,
                        diverged=never)

    solved = solve()
    assert solved.converged and solved.evaluations <= 45
    assert float(torch.linalg.vector_norm(solved.state[0] - exact) / torch.linalg.vector_norm(exact)) < 1e-8
    monkeypatch.setattr(solvers, "SECANT_PATIENCE", 10_000)
    assert not solve().converged


@pytest.mark.parametrize("memory", [1, 5])
def test_a_sample_already_at_its_fixed_point_leaves_the_others_converging(memory):
    """x ↦ x/2 + c with sample 0 started at its fixed point 2c, which the map returns exactly: its residual is 0
    at every evaluation, and its coefficients must stay finite (1/‖f‖ would overflow) while the others converge."""
    c = torch.randn(4, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    start = torch.zeros_like(c)
    start[0] = 2 * c[0]
    solved = anderson(lambda s: (0.5 * s[0] + c,), (start,), 200, tol=1e-12, memory=memory, diverged=never)
    assert solved.converged and bool(torch.isfinite(solved.state[0]).all())
    assert torch.equal(solved.state[0][0], 2 * c[0])
    assert torch.allclose(solved.state[0], 2 * c, rtol=1e-10)
