"""Properties of the estimators on random toy models, and of the conformance kit that checks them.

Exact limits (DESIGN.md): ep — conservative model, converged, small β; aep and adjoint — any converged stable
model. bptt is checked against finite differences, so the reference itself is tested. Most checks go through
``ep_core.testing`` so that the kit third parties run is exercised by the built-ins too, and the kit is shown
to fail on estimators that break the contract.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch
from epx_estimators.adjoint import Adjoint
from epx_estimators.aep import AEP
from epx_estimators.dfa import DFA
from epx_estimators.ep import EP
from hypothesis import given, settings

from ep_core.bptt import BPTT, BPTTConfig
from ep_core.harness import gradient_metrics
from ep_core.models.toy import Toy, ToyConfig
from ep_core.protocols import DeclaresConservative, DeclaresNonconservative, EquilibriumModel, GradientEstimate
from ep_core.config import Config, option
from ep_core.testing import (
    CHECK_NAMES,
    LIMIT_SETTINGS,
    SUITE_VERSION,
    ConformanceError,
    at_limit,
    check_estimator,
    parametrize_with_checks,
    check_exact_limit,
    conformance_limit,
    make_toy_problem,
    models,
    pytest_plugin,
    run_estimate,
    toy_models,
)

pytest_plugins = ["pytester"]
epx_check = pytest_plugin.epx_check  # the plugin's fixture, even without its pytest11 entry point

PROPERTY = settings(max_examples=25, deadline=None)


# --- exactness against bptt ---------------------------------------------------------------------------------

@PROPERTY
@given(toy_models(conservative=True))
def test_ep_aep_adjoint_equal_bptt_on_conservative_toys(problem):
    model, batch = problem
    reference = run_estimate(BPTT(), model, batch)
    for estimator in (EP(), AEP()):
        # cosine >= 0.999 and rel error <= 0.01 at beta 1e-3, T2 100
        check_exact_limit(estimator, model, batch, reference=reference)
    assert check_exact_limit(Adjoint(), model, batch, reference=reference)["rel_error"] < 1e-6


class UndeclaredToy(Toy):
    """The toy without its declared non-conservative part, so that aep linearises the whole force."""

    nonconservative = None


class WholeForceToy(Toy):
    """The toy without F − N alone, so that aep's nudged steps take F and N and subtract N's change, instead of
    the toy's own −∇E."""

    conservative = None


@PROPERTY
@given(toy_models(conservative=False))
def test_aep_adjoint_equal_bptt_on_nonconservative_toys(problem):
    """aep in each of its three forms: −∇E(x) + N(x*) + J_Nᵀv (the toy declares F − N), F − (J_N v − J_Nᵀv) (it
    declares N only) and F − (Jv − Jᵀv) (it declares neither)."""
    model, batch = problem
    reference = run_estimate(BPTT(), model, batch)
    check_exact_limit(AEP(), model, batch, reference=reference)
    assert isinstance(model, DeclaresConservative)
    for hiding in (WholeForceToy, UndeclaredToy):
        variant = hiding(problem.config, generator=torch.Generator()).to(problem.dtype)
        variant.load_state_dict(model.state_dict())
        assert not isinstance(variant, DeclaresConservative)
        assert isinstance(variant, DeclaresNonconservative) == (hiding is WholeForceToy)
        check_exact_limit(AEP(), variant, batch, reference=reference)
    assert check_exact_limit(Adjoint(), model, batch, reference=reference)["rel_error"] < 1e-6
    gmres = Adjoint(Adjoint.Config(solver="gmres", tol=1e-12))
    assert check_exact_limit(gmres, model, batch, reference=reference)["rel_error"] < 1e-6


def test_naive_ep_is_wrong_on_nonconservative_toys():
    """Without the correction, the vector-field rule is biased where J is not symmetric: aep is not."""
    cosines = {"ep": [], "aep": []}
    for seed in range(5):
        config = ToyConfig(units=6, inputs=3, outputs=2, conservative=False, coupling=0.7, T1=300)
        model, batch = make_toy_problem(config, init_seed=seed, batch_size=4, batch_seed=seed)
        reference = run_estimate(BPTT(), model, batch).grads
        for estimator in (EP(), AEP()):
            estimate = run_estimate(at_limit(estimator), model, batch).grads
            cosines[estimator.name].append(gradient_metrics(estimate, reference, {})["cosine"])
    ep_mean, aep_mean = (sum(c) / len(c) for c in cosines.values())
    assert aep_mean > 0.999999, cosines
    assert ep_mean < 0.99, cosines  # measured: 0.957
    assert all(e < a - 1e-3 for e, a in zip(cosines["ep"], cosines["aep"])), cosines


@PROPERTY
@given(toy_models())
def test_aep_free_phase_equals_eps(problem):
    model, batch = problem
    ep = run_estimate(EP(EP.Config(T2=1)), model, batch)
    aep = run_estimate(AEP(AEP.Config(T2=1)), model, batch)
    assert ep.equilibrium is not None and aep.equilibrium is not None
    assert len(ep.equilibrium.state) == len(aep.equilibrium.state)
    assert all(torch.equal(a, b) for a, b in zip(ep.equilibrium.state, aep.equilibrium.state))
    assert ep.equilibrium.residual == aep.equilibrium.residual


def unrolled_cost(model, batch) -> float:
    """C(x_T1(θ)), written out here rather than taken from ep_core.relax."""
    eps = model.dynamics.eps
    with torch.no_grad():
        x = model.init_state(batch)
        for _ in range(model.dynamics.T1):
            x = model.project(tuple(xi + eps * fi for xi, fi in zip(x, model.force(x, batch))))
        return float(model.cost(x, batch))


@PROPERTY
@given(toy_models(T1=30, max_units=5))
def test_bptt_equals_central_finite_differences(problem):
    model, batch = problem
    grads = run_estimate(BPTT(), model, batch).grads
    h = 1e-6
    for name, p in model.named_parameters():
        original = p.detach().clone()
        fd = torch.zeros_like(p)
        try:
            for i in range(p.numel()):
                with torch.no_grad():
                    p.view(-1)[i] = original.view(-1)[i] + h
                up = unrolled_cost(model, batch)
                with torch.no_grad():
                    p.view(-1)[i] = original.view(-1)[i] - h
                down = unrolled_cost(model, batch)
                with torch.no_grad():
                    p.view(-1)[i] = original.view(-1)[i]
                fd.view(-1)[i] = (up - down) / (2 * h)
        finally:
            with torch.no_grad():
                p.copy_(original)
        error = float(torch.linalg.vector_norm(fd - grads[name]))
        assert error <= 1e-5 * float(torch.linalg.vector_norm(fd)) + 1e-10, (name, fd, grads[name])


# --- the contract, through the kit --------------------------------------------------------------------------

BUILTINS = {
    "bptt": BPTT,
    "ep": EP,
    "aep": AEP,
    "adjoint": Adjoint,
    "adjoint-gmres": Adjoint(Adjoint.Config(solver="gmres")),
}
VARIANTS = {  # other code paths
    "ep-one-sided": EP(EP.Config(centered=False)),
    "aep-clip": AEP(AEP.Config(clip=1.0)),
    "adjoint-gmres": Adjoint(Adjoint.Config(solver="gmres")),
}


@parametrize_with_checks([BPTT, EP, AEP, Adjoint, DFA, DFA(DFA.Config(lam=1e-2, feedback="uniform")),
                          *VARIANTS.values()], examples=6)
def test_builtin_estimators_meet_the_contract(estimator, check):
    """Every check of the suite, on every built-in estimator and variant: the kit third parties run."""
    check(estimator)


def test_a_clean_report_lists_every_check():
    report = check_estimator(AEP, examples=3)
    assert report.passed and report.suite == SUITE_VERSION
    assert [r.name for r in report.results] == list(CHECK_NAMES)
    statuses = {r.name: r.status for r in report.results}
    assert statuses.pop("state_round_trip") == statuses.pop("declared_properties") == "skipped"
    assert set(statuses.values()) == {"passed"}
    skipped = {r.name for r in check_estimator(BPTT, examples=2).results if r.status == "skipped"}
    assert skipped == {"exact_limit", "cost_scaling", "state_round_trip", "declared_properties"}  # bptt declares none


def test_kit_limits_of_the_builtins():
    limits = [conformance_limit(cls) for cls in (BPTT, EP, AEP, Adjoint)]
    assert limits == [None, "conservative", "any-stable", "any-stable"]
    # only the fields a config has are changed, and None-valued options (aep's clip) survive
    assert at_limit(AEP()).config.to_dict() == {**AEP().config.to_dict(), **LIMIT_SETTINGS}
    adjoint = Adjoint()
    assert at_limit(adjoint) is adjoint  # no beta, no T2: unchanged

    class Declared(EP):
        conformance_limit: ClassVar[str | None] = None

    class Invalid(EP):
        conformance_limit: ClassVar[str] = "sometimes"

    assert conformance_limit(Declared) is None
    with pytest.raises(ValueError, match="sometimes"):
        conformance_limit(Invalid)


# --- the kit fails estimators that break the contract -------------------------------------------------------

class Flawed:
    """A third-party-style estimator: bptt, plus one deliberate flaw."""

    name: ClassVar[str] = "flawed"
    Config: ClassVar[type] = BPTTConfig
    requires: ClassVar[type] = EquilibriumModel
    exact_limit: ClassVar[str] = "always"
    conformance_limit: ClassVar[str | None] = "any-stable"
    flaw: ClassVar[str] = ""

    def __init__(self, config: BPTTConfig | None = None):
        self.config = config or BPTTConfig()

    def estimate(self, model, batch, *, generator) -> GradientEstimate:
        estimate = BPTT().estimate(model, batch, generator=generator)
        grads, params = estimate.grads, dict(model.named_parameters())
        match self.flaw:
            case "writes param.grad":
                for name, p in params.items():
                    p.grad = grads[name].clone()
            case "changes a parameter":
                with torch.no_grad():
                    params["b"].add_(torch.finfo(params["b"].dtype).eps)
            case "global randomness":
                grads["W"] = grads["W"] + 1e-9 * torch.randn(grads["W"].shape, dtype=grads["W"].dtype)
            case "missing gradient":
                del grads["U"]
            case "non-finite":
                grads["U"] = grads["U"].clone()
                grads["U"].view(-1)[0] = math.nan
            case "wrong shape":
                grads["b"] = grads["b"][None]
            case "wrong dtype":
                grads["W"] = grads["W"].float()
            case "sign flipped":
                estimate.grads = {name: -g for name, g in grads.items()}
            case "scaled per parameter":
                grads["W"] = 3 * grads["W"]
            case "halved overall":
                estimate.grads = {name: 0.5 * g for name, g in grads.items()}
            case "normalised":
                total = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
                estimate.grads = {name: g / total for name, g in grads.items()}
        return estimate


def small_toys(*, conservative=None):
    """Faster problems for the kit's own tests: weaker coupling contracts within 120 steps."""
    return models(conservative=conservative, T1=120, max_units=5, max_coupling=0.5)


def test_only_the_broken_rule_fails():
    report = check_estimator(type("WritesGrad", (Flawed,), {"flaw": "writes param.grad"}), examples=3,
                             models=small_toys, shrink=False, raise_on_failure=False)
    assert [r.name for r in report.failures] == ["param_grad_untouched"]


@pytest.mark.parametrize(("flaw", "check", "message"), [
    ("writes param.grad", "param_grad_untouched", r"set W\.grad|changed b\.grad|never touch"),
    ("changes a parameter", "model_untouched", r"changed the model: \['b'\]"),
    ("global randomness", "deterministic", r"not deterministic.*'W'"),
    ("missing gradient", "gradient_for_every_parameter", r"no gradient for parameters \['U'\]"),
    ("non-finite", "finite_gradients", r"'U' has 1 non-finite"),
    ("wrong shape", "gradient_shape_dtype_device", r"gradient of 'b' is \(1, \d\)"),
    ("wrong dtype", "gradient_shape_dtype_device", r"'W' .*torch\.float32"),
    ("sign flipped", "exact_limit", r"exact_limit: declares itself exact .*cosine -1\.000000 < 0\.999"),
    ("scaled per parameter", "exact_limit", r"exact_limit: declares itself exact .*cosine 0\.\d+ < 0\.999"),
    ("halved overall", "exact_limit",
     r"cosine 1\.000000, rel error 0\.5000 > 0\.01, norm ratio 0\.5000 \(\|1 − ratio\| > 0\.01\)"),
    ("normalised", "cost_scaling", r"gradient of (4|0\.25)·C is not"),
])
def test_kit_names_the_check_a_broken_estimator_fails(flaw, check, message, shrink=False):
    # Unshrunk: shrinking costs 15-35 s a flaw and does not change which check fails; the test below shrinks.
    estimator = type(flaw.title().replace(" ", "").replace(".", ""), (Flawed,), {"flaw": flaw})
    with pytest.raises(ConformanceError) as caught:
        check_estimator(estimator, examples=4, checks=[check], models=small_toys, shrink=shrink)
    failed = {r.name: r for r in caught.value.report.failures}
    assert check in failed, caught.value.report
    assert re.search(message, failed[check].message), failed[check].message
    assert "Draw 1 (problem): make_toy_problem(" in failed[check].message  # Hypothesis's falsifying example


def test_a_shrunk_failure_still_names_the_check_and_its_example():
    """The default run shrinks the failing example before reporting it."""
    test_kit_names_the_check_a_broken_estimator_fails("non-finite", "finite_gradients", r"'U' has 1 non-finite",
                                                      shrink=True)


def test_report_is_a_value_when_asked_and_expected_failures_are_xfail():
    broken = type("SignFlipped", (Flawed,), {"flaw": "sign flipped"})
    report = check_estimator(broken, examples=3, raise_on_failure=False, models=small_toys, shrink=False,
                             expected_failed_checks={"exact_limit": "known sign bug"})
    statuses = {r.name: r.status for r in report.results}
    assert statuses["exact_limit"] == "xfail" and report.passed
    assert "known sign bug" in next(r.message for r in report.results if r.name == "exact_limit")
    clean = check_estimator(Flawed, examples=2, checks=["deterministic"],
                            expected_failed_checks={"deterministic": "flaky"})
    assert [r.status for r in clean.results] == ["xpass"]


def test_a_pinned_suite_turns_newer_checks_into_warnings():
    normalising = type("Normalised", (Flawed,), {"flaw": "normalised"})
    report = check_estimator(normalising, examples=3, suite=1, checks=["cost_scaling", "deterministic"],
                             models=small_toys, shrink=False)
    assert report.passed
    assert {r.name: r.status for r in report.results} == {"deterministic": "passed", "cost_scaling": "warning"}
    with pytest.raises(ValueError, match="suite must be between 1"):
        check_estimator(Flawed, suite=SUITE_VERSION + 1)
    with pytest.raises(ValueError, match="unknown check"):
        check_estimator(Flawed, checks=["determinstic"])


def test_a_pinned_suite_turns_newer_assertions_of_exact_limit_into_warnings():
    """Suite 3 added the magnitude to exact_limit; pinned to 2, only suite 2's cosine bound can fail it."""
    kit = {"examples": 3, "checks": ["exact_limit"], "suite": 2, "models": small_toys, "shrink": False,
           "raise_on_failure": False}
    halved = check_estimator(type("Halved", (Flawed,), {"flaw": "halved overall"}), **kit).results[0]
    assert halved.status == "warning", halved
    assert halved.message.startswith("strengthened in suite 3 (pinned to 2): "), halved.message
    assert "norm ratio 0.5000 (|1 − ratio| > 0.01)" in halved.message
    flipped = check_estimator(type("SignFlipped", (Flawed,), {"flaw": "sign flipped"}), **kit).results[0]
    assert flipped.status == "failed" and "cosine -1.000000 < 0.999" in flipped.message


class StateNormalisedEP(EP):
    """ep whose gradient is divided by the norm of the whole free state: over a stack, of all the problems."""

    def estimate(self, model, batch, *, generator) -> GradientEstimate:
        estimate = super().estimate(model, batch, generator=generator)
        size = torch.sqrt(sum(x.pow(2).sum() for x in estimate.equilibrium.state))
        return replace(estimate, grads={name: g / size for name, g in estimate.grads.items()})


class BetaScaledEP(EP):
    """ep's gradient times β: it declares StacksNudge (EP does), yet is not w times itself at w·β for the cost w·C."""

    def estimate(self, model, batch, *, generator) -> GradientEstimate:
        estimate = super().estimate(model, batch, generator=generator)
        return replace(estimate, grads={name: self.config.beta * g for name, g in estimate.grads.items()})


class StepScaledEP(EP):
    """ep's gradient times ε: it declares ForceHomogeneous (EP does), yet on a stack it sees the first member's ε."""

    def estimate(self, model, batch, *, generator) -> GradientEstimate:
        estimate = super().estimate(model, batch, generator=generator)
        return replace(estimate, grads={name: model.dynamics.eps * g for name, g in estimate.grads.items()})


@pytest.mark.parametrize("flawed, message", [
    (StateNormalisedEP, r"problem \d's gradient of '\w+' differs from its own by .* the estimate mixes the problems"),
    (BetaScaledEP, r"problem 2's gradient .* or does not scale with the nudge as StacksNudge says"),
    (StepScaledEP, r"problem 2's gradient .* or does not scale with the force as ForceHomogeneous says \(problem 2 "
                   r"at eps=0\.\d+\)"),
])
def test_stacked_problems_catches_an_estimate_that_mixes_them_or_a_wrong_nudge_or_step(flawed, message):
    report = check_estimator(flawed, examples=3, checks=["stacked_problems"], models=small_toys, shrink=False,
                             raise_on_failure=False)
    (result,) = report.results
    assert result.status == "failed" and re.search(message, result.message), result.message
    assert check_estimator(EP, examples=3, checks=["stacked_problems"], models=small_toys).passed
    unstacked = check_estimator(Adjoint, examples=1, checks=["stacked_problems"]).results[0]
    assert unstacked.status == "skipped" and "does not declare Batchable" in unstacked.message


class ScaledAdjoint(Adjoint):
    """adjoint's gradient times ``factor``: the exact direction, the wrong size."""

    factor: ClassVar[float] = 1.0

    def estimate(self, model, batch, *, generator) -> GradientEstimate:
        estimate = super().estimate(model, batch, generator=generator)
        return replace(estimate, grads={name: self.factor * g for name, g in estimate.grads.items()})


@pytest.mark.parametrize("factor", [0.5, 1.05])
def test_exact_limit_fails_the_exact_direction_at_the_wrong_size(factor):
    """The cosine ignores a constant factor and cost_scaling cannot see one: exact_limit's magnitude must."""
    scaled = type("ScaledAdjoint", (ScaledAdjoint,), {"factor": factor})
    report = check_estimator(scaled, examples=3, checks=["exact_limit", "cost_scaling"], models=small_toys,
                             shrink=False, raise_on_failure=False)
    assert {r.name: r.status for r in report.results} == {"exact_limit": "failed", "cost_scaling": "passed"}
    expected = (f"adjoint: exact_limit: declares itself exact in the limit 'any-stable', but its gradient is not "
                f"bptt's: cosine 1.000000, rel error {abs(1 - factor):.4f} > 0.01, norm ratio {factor:.4f} "
                f"(|1 − ratio| > 0.01) with config ")
    assert expected in report.failures[0].message, report.failures[0].message


def test_max_rel_error_sets_the_magnitude_tolerance():
    five_percent = type("ScaledAdjoint", (ScaledAdjoint,), {"factor": 1.05})
    kit = {"examples": 2, "checks": ["exact_limit"], "models": small_toys, "shrink": False}
    assert check_estimator(five_percent, max_rel_error=0.06, **kit).passed
    with pytest.raises(ConformanceError) as caught:
        check_estimator(five_percent, max_rel_error=0.04, **kit)
    assert "rel error 0.0500 > 0.04, norm ratio 1.0500 (|1 − ratio| > 0.04)" in str(caught.value), caught.value


def test_valid_configs_check_finds_an_estimator_that_crashes_on_a_valid_setting():
    @dataclass(frozen=True)
    class KConfig(Config):
        k: int = option(2, "a knob", ge=1, le=10)

    class CrashesAtLargeK(Flawed):
        Config: ClassVar[type] = KConfig

        def __init__(self, config: KConfig | None = None):
            self.config = config or KConfig()

        def estimate(self, model, batch, *, generator):
            if self.config.k > 7:
                raise IndexError("k out of range")
            return BPTT().estimate(model, batch, generator=generator)

    with pytest.raises(ConformanceError) as caught:
        check_estimator(CrashesAtLargeK, examples=15, checks=["valid_configs"], models=small_toys)
    message = caught.value.report.failures[0].message
    assert "raised IndexError" in message and "Draw 1 (config):" in message


def test_declarations_reject_limit_settings_the_config_does_not_have():
    typo = type("Typo", (Flawed,), {"limit_settings": {"bta": 1e-3}})
    with pytest.raises(ConformanceError, match=r"limit_settings names \['bta'\]"):
        check_estimator(typo, checks=["declarations"])


def test_kit_catches_a_bad_declaration():
    @dataclass
    class NotAConfig:
        beta: float = 0.1

    estimator = type("NoConfig", (Flawed,), {"Config": NotAConfig})
    with pytest.raises(AssertionError, match="Config"):
        check_estimator(estimator, examples=1)


def test_kit_catches_naive_ep_claiming_any_stable_model():
    """Naive ep, mis-declared as exact for non-conservative models: the kit must find a counterexample."""
    claims_too_much = type("OverclaimingEP", (EP,), {"conformance_limit": "any-stable"})
    with pytest.raises(AssertionError, match=r"ep: exact_limit: declares itself exact in the limit 'any-stable'"):
        check_estimator(claims_too_much, examples=8, checks=["exact_limit"])


def test_toy_problem_rebuilds_bit_identically():
    config = ToyConfig(units=5, conservative=False)
    problem = make_toy_problem(config, init_seed=3, batch_size=2, batch_seed=4)
    names = {"make_toy_problem": make_toy_problem, "ToyConfig": ToyConfig, "torch": torch}
    again = eval(repr(problem), names)  # the repr Hypothesis prints for a falsifying example
    for (_, p), (_, q) in zip(problem.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q) and p.dtype == torch.float64
    assert all(torch.equal(problem.batch[k], again.batch[k]) for k in problem.batch)
    model, _ = problem.rebuild()
    assert torch.equal(model.W, problem.model.W) and model.W is not problem.model.W


def test_pytest_plugin_provides_fixtures_options_and_profiles(pytester):
    pytester.makepyfile("""
        from hypothesis import settings

        from ep_core.bptt import BPTT
        from ep_core.testing import check_estimator

        def test_third_party(epx_check, epx_registry, epx_estimators):
            assert epx_check is check_estimator
            assert epx_check(BPTT, examples=1, checks=["deterministic"]).passed
            assert epx_registry.get("estimator", "bptt").factory is BPTT
            assert epx_estimators == ["bptt", "ep"]
            assert settings().derandomize and settings().max_examples == 25
    """)
    # "no:epx" keeps the installed entry point (if any) from registering the same module twice
    plugin = ["-p", "no:epx", "-p", "ep_core.testing.pytest_plugin", "-p", "no:cacheprovider"]
    result = pytester.runpytest(*plugin, "--epx-estimators", "bptt,ep", "--epx-profile", "epx-ci")
    result.assert_outcomes(passed=1)
    typo = pytester.runpytest(*plugin, "--epx-estimators", "bptt,aepp")
    typo.assert_outcomes(errors=1)
    assert "did you mean 'aep'" in typo.stdout.str()
