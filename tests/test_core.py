"""ep_core's building blocks: config validation, gradient metrics, divergence errors, GMRES, --set routing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from epx_estimators.adjoint import Adjoint, AdjointConfig
from epx_estimators.aep import AEP, AEPConfig
from epx_estimators.ep import EP, EPConfig

from ep_core.bptt import BPTT
from ep_core.config import ConfigError
from ep_core.harness import gradient_metrics
from ep_core.krylov import gmres
from ep_core.models.cet import CET, CETConfig
from ep_core.models.toy import Toy, ToyConfig
from ep_core.protocols import DivergenceError
from ep_core.relax import free_phase
from ep_core.session import split_estimator_settings

# --- config -------------------------------------------------------------------------------------------------

def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        EPConfig.from_mapping({"bta": "0.1"})
    assert info.value.field == "bta"
    message = str(info.value)
    assert message.startswith("bta:") and "did you mean 'beta'" in message
    assert "T2" in message and "centered" in message  # the valid options are listed


@pytest.mark.parametrize("build", [
    lambda: EPConfig(beta=-1),
    lambda: EPConfig.from_mapping({"beta": "-1"}),
    lambda: AEPConfig.from_mapping(beta=-1),
    lambda: EPConfig().replace(beta=-1.0),
])
def test_out_of_range_names_the_field_and_the_range(build):
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.field == "beta"
    assert "beta" in str(info.value) and "> 0" in str(info.value)


@pytest.mark.parametrize(("config", "key", "value", "expected"), [
    (EPConfig, "beta", "1e-3", 1e-3),
    (EPConfig, "beta", " 0.5 ", 0.5),
    (EPConfig, "T2", "7", 7),
    (EPConfig, "centered", "false", False),
    (EPConfig, "centered", "False", False),
    (EPConfig, "centered", "no", False),
    (EPConfig, "centered", "off", False),
    (EPConfig, "centered", "0", False),
    (EPConfig, "centered", "true", True),
    (EPConfig, "centered", "YES", True),
    (EPConfig, "centered", "on", True),
    (EPConfig, "centered", "1", True),
    (AEPConfig, "clip", "none", None),
    (AEPConfig, "clip", "None", None),
    (AEPConfig, "clip", "null", None),
    (AEPConfig, "clip", "2.5", 2.5),
    (AdjointConfig, "Tadj", "none", None),
    (AdjointConfig, "Tadj", "12", 12),
    (AdjointConfig, "solver", "gmres", "gmres"),
    (ToyConfig, "conservative", "false", False),
])
def test_strings_are_parsed(config, key, value, expected):
    parsed = getattr(config.from_mapping({key: value}), key)
    assert parsed == expected and type(parsed) is type(expected)


def test_numbers_are_coerced_and_bools_are_not_numbers():
    assert type(EPConfig(beta=1).beta) is float
    assert EPConfig.from_mapping(T2=5.0).T2 == 5
    with pytest.raises(ConfigError, match="beta"):
        EPConfig(beta=True)
    with pytest.raises(ConfigError, match="centered"):
        EPConfig(centered=1)


@pytest.mark.parametrize(("config", "key", "value", "needle"), [
    (EPConfig, "T2", "1.5", "expected int"),
    (EPConfig, "T2", "0", ">= 1"),
    (EPConfig, "beta", "abc", "expected float"),
    (EPConfig, "beta", "nan", "not finite"),
    (EPConfig, "beta", "inf", "not finite"),
    (EPConfig, "beta", "none", "expected float"),
    (EPConfig, "centered", "maybe", "expected true or false"),
    (AdjointConfig, "solver", "cg", "one of neumann, gmres"),
    (AEPConfig, "clip", "0.5", ">= 1, or none"),
    (ToyConfig, "coupling", "1", "< 1"),
])
def test_malformed_values_are_errors(config, key, value, needle):
    with pytest.raises(ConfigError) as info:
        config.from_mapping({key: value})
    assert info.value.field == key and needle in str(info.value)


def test_config_checks_across_fields():
    with pytest.raises(ConfigError, match="outputs"):
        ToyConfig(units=2, outputs=3)
    with pytest.raises(ConfigError, match="stride"):
        CETConfig(image=28, patch=5, stride=5)


def test_replace_keeps_none_valued_options():
    """An optional field left at None (aep's clip, adjoint's Tadj) must survive replace()."""
    assert AEPConfig().replace(beta=0.1) == AEPConfig(beta=0.1)
    assert AdjointConfig().replace(solver="gmres").Tadj is None


def test_describe_lists_every_field_with_its_range():
    rows = {row["name"]: row for row in EPConfig.describe()}
    assert set(rows) == {"beta", "T2", "centered"}
    assert rows["beta"]["range"] == "> 0" and rows["beta"]["default"] == 0.02 and rows["beta"]["help"]
    assert {row["name"]: row["range"] for row in AEPConfig.describe()}["clip"] == ">= 1, or none"


# --- gradient metrics ---------------------------------------------------------------------------------------

def test_gradient_metrics_known_values():
    estimate = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.0, 3.0]]), "c": torch.tensor([2.0])}
    reference = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[0.0, -1.0]]), "c": torch.tensor([1.0])}
    m = gradient_metrics(estimate, reference, {"ab": ["a", "b"], "c": ["c"]})
    assert m["parameters"]["a"] == pytest.approx(1 / math.sqrt(2))
    assert m["parameters"]["b"] == pytest.approx(-1.0)
    assert m["parameters"]["c"] == pytest.approx(1.0)
    assert m["groups"]["ab"] == pytest.approx((1 - 3) / (math.sqrt(10) * math.sqrt(3)))
    assert m["groups"]["c"] == pytest.approx(1.0)
    # all: est (1, 0, 0, 3, 2), ref (1, 1, 0, -1, 1)
    assert m["cosine"] == pytest.approx((1 - 3 + 2) / (math.sqrt(14) * 2))
    assert m["rel_error"] == pytest.approx(math.sqrt(0 + 1 + 0 + 16 + 1) / 2)
    assert m["norm_ratio"] == pytest.approx(math.sqrt(14) / 2)


def test_gradient_metrics_zero_reference_is_none_not_nan():
    estimate = {"w": torch.tensor([1.0, 2.0]), "z": torch.tensor([1.0])}
    reference = {"w": torch.tensor([2.0, 4.0]), "z": torch.tensor([0.0])}
    m = gradient_metrics(estimate, reference, {"weights": ["w"], "dead": ["z"]})
    assert m["groups"]["dead"] is None and m["parameters"]["z"] is None
    assert m["groups"]["weights"] == pytest.approx(1.0)

    zero = {"w": torch.zeros(2), "z": torch.zeros(1)}
    m = gradient_metrics(estimate, zero, {"all": ["w", "z"]})
    assert m["cosine"] is None and m["rel_error"] is None and m["norm_ratio"] is None
    assert m["groups"]["all"] is None
    json.dumps(m, allow_nan=False)  # no NaN anywhere

    m = gradient_metrics(zero, reference, {"weights": ["w"]})  # a zero estimate of a nonzero reference
    assert m["cosine"] == 0.0 and m["rel_error"] == pytest.approx(1.0) and m["norm_ratio"] == 0.0


def test_gradient_metrics_missing_parameter_is_an_error():
    with pytest.raises(ValueError, match="'z'"):
        gradient_metrics({"w": torch.ones(2)}, {"w": torch.ones(2), "z": torch.ones(1)}, {})


# --- divergence ---------------------------------------------------------------------------------------------

def _first_nonfinite_step(model, batch) -> int:
    """Written out here: the first t at which x_t = x_{t-1} + εF(x_{t-1}) is not finite."""
    eps = model.dynamics.eps
    with torch.no_grad():
        x = model.init_state(batch)
        for t in range(1, model.dynamics.T1 + 1):
            x = model.project(tuple(xi + eps * fi for xi, fi in zip(x, model.force(x, batch))))
            if not all(torch.isfinite(xi).all() for xi in x):
                return t
    raise AssertionError("did not diverge")


def _toy(**overrides) -> Toy:
    return Toy(ToyConfig(**overrides), generator=torch.Generator().manual_seed(0)).double()


def _toy_batch(model: Toy):
    return model.make_batch(3, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("run", [
    lambda model, batch: free_phase(model, batch),
    lambda model, batch: BPTT().estimate(model, batch, generator=torch.Generator()),
    lambda model, batch: Adjoint().estimate(model, batch, generator=torch.Generator()),
])
def test_free_phase_divergence_names_the_step_eps_and_a_remedy(run):
    model = _toy(eps=1e6, T1=300)
    batch = _toy_batch(model)
    with pytest.raises(DivergenceError) as info:
        run(model, batch)
    error, message = info.value, str(info.value)
    assert error.phase == "free" and error.eps == 1e6
    assert error.step == _first_nonfinite_step(model, batch) and 1 < error.step < 300
    assert f"step {error.step}" in message and "eps=1e+06" in message
    assert "lower the step size" in message and "eps=" in message.split(";")[1]


def test_cet_divergence_names_the_step_eps_and_a_remedy():
    model = CET(CETConfig(dim=16, heads=2, head_dim=8, memories=16, eps=1e100),
                generator=torch.Generator().manual_seed(0)).double()
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch = model.prepare_batch(images, torch.zeros(2), generator=torch.Generator().manual_seed(2))
    with pytest.raises(DivergenceError) as info:
        free_phase(model, batch)
    assert info.value.step == _first_nonfinite_step(model, batch)
    assert f"step {info.value.step}" in str(info.value) and "eps=1e+100" in str(info.value)
    assert "lower the step size" in str(info.value)


@pytest.mark.parametrize("estimator", [EP(EPConfig(beta=1e8, T2=100)), AEP(AEPConfig(beta=1e8, T2=100))])
def test_nudged_divergence_suggests_a_smaller_beta(estimator):
    model = _toy(T1=300)
    batch = _toy_batch(model)
    with pytest.raises(DivergenceError) as info:
        estimator.estimate(model, batch, generator=torch.Generator())
    assert info.value.phase == "nudged" and 1 <= info.value.step <= 100
    assert f"step {info.value.step}" in str(info.value) and "beta" in str(info.value)


# --- GMRES --------------------------------------------------------------------------------------------------

SHAPES = ((3, 4), (5,))  # a state of two tensors, 17 entries


def _as_state(vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return vector[:12].reshape(3, 4), vector[12:]


def _as_vector(state) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in state])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["near-identity", "indefinite"])
def test_gmres_matches_a_dense_solve(seed, kind):
    g = torch.Generator().manual_seed(seed)
    n = 17
    noise = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    if kind == "near-identity":
        A = torch.eye(n, dtype=torch.float64) + 0.3 * noise
    else:  # eigenvalues on both sides of 0 and spectral radius of I − A above 1: Neumann would diverge
        signs = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0).double()
        A = torch.diag(signs * (1 + torch.rand(n, generator=g, dtype=torch.float64))) + 0.1 * noise
    assert torch.linalg.cond(A) < 50
    rhs = (torch.randn(3, 4, generator=g, dtype=torch.float64),
           torch.randn(5, generator=g, dtype=torch.float64))
    solution, applications = gmres(lambda u: _as_state(A @ _as_vector(u)), rhs, max_iter=n, tol=1e-13)
    assert [tuple(t.shape) for t in solution] == [tuple(s) for s in SHAPES]
    expected = torch.linalg.solve(A, _as_vector(rhs))
    assert torch.allclose(_as_vector(solution), expected, rtol=0, atol=1e-8)
    assert 1 <= applications <= n


def test_gmres_edge_cases():
    zero = (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    solution, applications = gmres(lambda u: u, zero, max_iter=5, tol=1e-10)
    assert applications == 0 and all(torch.equal(s, z) for s, z in zip(solution, zero))
    rhs = (torch.ones(3, 4, dtype=torch.float64), torch.arange(5.0, dtype=torch.float64))
    solution, applications = gmres(lambda u: tuple(2 * t for t in u), rhs, max_iter=5, tol=1e-10)
    assert applications == 1  # the Krylov space of a multiple of I is one-dimensional
    assert torch.allclose(_as_vector(solution), _as_vector(rhs) / 2, rtol=0, atol=1e-12)


# --- --set routing ------------------------------------------------------------------------------------------

CLASSES = {"bptt": BPTT, "ep": EP, "aep": AEP, "adjoint": Adjoint}


def test_settings_go_to_every_owner_and_scoped_keys_to_one():
    routed = split_estimator_settings({"beta": "0.01", "T2": "5", "aep.clip": "1", "solver": "gmres",
                                       "ep.centered": "false"}, CLASSES)
    assert routed == {
        "bptt": {},
        "ep": {"beta": "0.01", "T2": "5", "centered": "false"},
        "aep": {"beta": "0.01", "T2": "5", "clip": "1"},
        "adjoint": {"solver": "gmres"},
    }
    built = {label: cls.Config.from_mapping(routed[label]) for label, cls in CLASSES.items()}
    assert built["aep"].clip == 1.0 and built["ep"].beta == built["aep"].beta == 0.01
    assert built["ep"].centered is False


def test_scoped_setting_overrides_only_its_target():
    routed = split_estimator_settings({"aep.beta": "0.5"}, CLASSES)
    assert routed["aep"] == {"beta": "0.5"} and routed["ep"] == {}


@pytest.mark.parametrize(("settings", "field", "needle"), [
    ({"bta": "1"}, "bta", "did you mean 'beta'"),
    ({"clip": "1"}, "clip", None),  # aep is not selected below
    ({"ep.clip": "1"}, "ep.clip", "ep has no option 'clip'"),
    ({"aepp.beta": "1"}, "aepp.beta", "did you mean 'aep'"),
    ({"dfa.beta": "1"}, "dfa.beta", "not among the estimators"),
])
def test_unowned_settings_are_errors(settings, field, needle):
    classes = CLASSES if field != "clip" else {"ep": EP, "adjoint": Adjoint}
    with pytest.raises(ConfigError) as info:
        split_estimator_settings(settings, classes)
    assert info.value.field == field
    if needle:
        assert needle in str(info.value)


def test_the_harness_counts_force_evaluations_itself():
    """No estimator counts by hand: the harness runs the first estimate on a counting view of the model."""
    from epx_estimators.aep import AEP
    from epx_estimators.ep import EP

    from ep_core.bptt import BPTT
    from ep_core.harness import compare
    from ep_core.models.toy import Toy, ToyConfig

    model = Toy(ToyConfig(conservative=False, T1=50), generator=torch.Generator().manual_seed(0))
    batch = model.make_batch(4, generator=torch.Generator().manual_seed(1))
    rows = {r.label: r for r in compare([("ep", EP(EP.Config(T2=7))), ("aep", AEP(AEP.Config(T2=7)))], model, batch,
                                        reference=("bptt", BPTT()), repeats=1).results}
    assert rows["bptt"].force_evals == 50 + 1                    # T1 unrolled steps and the residual
    assert rows["ep"].force_evals == 50 + 1 + 2 * 7 + 1          # free phase, residual, ±β phases, the pairing
    # The toy evaluates F − N alone: aep's nudged steps take −∇E, not F, and N once, at x*, for J_Nᵀ.
    assert rows["aep"].force_evals == rows["ep"].force_evals - 2 * 7
    assert rows["aep"].stats["conservative_evals"] == 2 * 7 and rows["aep"].stats["nonconservative_evals"] == 1
    assert "force_evals" not in rows["ep"].stats


def test_estimate_stats_are_typed():
    """Stats are a dataclass per estimator, reported by field name; a plain dict is refused where it is made."""
    from epx_estimators.adjoint import AdjointStats

    from ep_core.harness import compare
    from ep_core.protocols import EstimateStats, GradientEstimate

    with pytest.raises(TypeError, match="EstimateStats"):
        GradientEstimate(grads={}, stats={"residual": 0.0})
    with pytest.raises(TypeError, match="Equilibrium"):
        GradientEstimate(grads={}, equilibrium=(torch.zeros(1),))
    model = Toy(ToyConfig(T1=60), generator=torch.Generator().manual_seed(0))
    batch = model.make_batch(4, generator=torch.Generator().manual_seed(1))
    estimate = Adjoint(AdjointConfig(Tadj=30)).estimate(model, batch, generator=torch.Generator())
    assert isinstance(estimate.stats, AdjointStats) and isinstance(estimate.stats, EstimateStats)
    assert estimate.equilibrium.steps == 60 and estimate.equilibrium.residual < 1e-6
    rows = {r.label: r for r in compare([("adjoint", Adjoint(AdjointConfig(Tadj=30)))], model, batch,
                                        reference=("bptt", BPTT()), repeats=1).results}
    assert set(rows["adjoint"].stats) == {"T1", "vjp_evals", "adjoint_residual"}
    assert rows["adjoint"].stats["vjp_evals"] == estimate.stats.vjp_evals <= 31
    assert rows["adjoint"].residual == estimate.equilibrium.residual
    assert rows["bptt"].stats == {"T1": 60}


def test_iterate_reads_finiteness_per_chunk_yet_names_the_exact_step():
    """x ← 2x in float32 overflows at step 128: found by re-running the chunk it fell in. A sum that overflows
    on finite states (2 × 3e38) is a false alarm: the re-run finds no step and the iteration goes on."""
    from ep_core.solvers import CHECK_EVERY, iterate

    steps_seen = []

    def diverged(t: int):
        steps_seen.append(t)
        raise DivergenceError("free", t, 1.0, "test")

    with pytest.raises(DivergenceError):
        iterate(lambda x: (2 * x[0],), (torch.ones(1),), 300, diverged=diverged)
    assert steps_seen == [128] and 128 % CHECK_EVERY == 0
    with pytest.raises(DivergenceError):  # a last chunk shorter than the others
        iterate(lambda x: (2 * x[0],), (4 * torch.ones(1),), 130, diverged=diverged)
    assert steps_seen[-1] == 126
    calls = []
    huge = (torch.full((2,), 3e38),)
    end = iterate(lambda x: calls.append(1) or x, huge, 20, diverged=diverged)
    assert torch.equal(end[0], huge[0]) and len(calls) == 2 * 20  # both chunks' flags overflowed: each ran twice
    assert iterate(lambda x: (x[0] + 1,), (torch.zeros(1),), 37, diverged=diverged)[0].item() == 37
