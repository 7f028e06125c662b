"""lm: the causal equilibrium attention model of seed 002, on real tiny Shakespeare where text matters."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ep_core.batching import stack
from ep_core.config import ConfigError
from ep_core.distributed import cost_share
from ep_core.harness import compare, counting
from ep_core.models.lm import LM, LMConfig
from ep_core.plugins import load
from ep_core.protocols import DeclaresConservative, DifferentiatesCost
from ep_core.relax import cost_gradient, free_phase
from ep_core.session import build_batch, build_estimator, build_model, load_data, run_comparison
from ep_core.testing.conformance import _ScaledCost
from ep_core.datasets.text import make_text_sample

TINY = {"context": 12, "width": 16, "heads": 2, "vocab": 11}


def tiny_lm(seed: int = 0, **overrides) -> LM:
    return LM(LMConfig(**{**TINY, **overrides}), generator=torch.Generator().manual_seed(seed)).double()


def token_batch(model: LM, seed: int = 0, size: int = 3):
    g = torch.Generator().manual_seed(100 + seed)
    cfg = model.config
    tokens = torch.randint(cfg.vocab, (size, cfg.context + 1), generator=g)
    return model.prepare_batch(tokens[:, :-1], tokens[:, 1:], generator=g)


def test_attention_is_causal():
    model = tiny_lm()
    z = torch.randn(2, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    changed = z.clone()
    changed[:, 7:] += 1.0
    before, after = model.attention(z), model.attention(changed)
    assert torch.allclose(before[:, :7], after[:, :7], atol=1e-12)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize("gain_bound", [0.9, 0.3])
def test_force_is_clamp_plus_damped_attention_and_conservative_at_s0(gain_bound):
    """The force's fused kernels compute the written-out definition, with the gain bound binding (0.3) or not."""
    model = tiny_lm(s=0.7, c=1.3, gain_bound=gain_bound)
    batch = token_batch(model)
    z = torch.randn(3, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_in = model.embed(batch)
    (force,) = model.force((z,), batch)
    assert torch.allclose(force, -(z - x_in) + 0.7 * (model.attention(z) - 1.3 * z), atol=1e-12)
    (nonconservative,) = model.nonconservative((z,), batch)
    assert torch.allclose(nonconservative, 0.7 * model.attention(z), atol=1e-12)
    (split_force,), (split_part,) = model.split_force((z,), batch)
    assert torch.allclose(split_force, force, atol=1e-12) and torch.allclose(split_part, nonconservative, atol=1e-12)
    (cached,) = model.force((z,), model.with_parameter_terms(batch))
    assert torch.allclose(cached, force, atol=1e-12)
    conservative = tiny_lm(s=0.0)
    (f0,) = conservative.force((z,), batch)
    assert torch.allclose(f0, conservative.embed(batch) - z)  # −∇ of ½||z − x_in||²
    (split0,), (part0,) = conservative.split_force((z,), batch)
    assert torch.equal(split0, f0) and not part0.any()


def test_attention_jacobian_is_not_symmetric():
    model = tiny_lm()
    z = torch.randn(1, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    jacobian = torch.autograd.functional.jacobian(model.attention, z).reshape(12 * 16, 12 * 16)
    asymmetry = torch.linalg.matrix_norm(jacobian - jacobian.T) / torch.linalg.matrix_norm(jacobian)
    assert asymmetry > 0.5  # causal: position t never reads a later one, so J is far from Jᵀ


def test_cost_is_next_character_cross_entropy_and_uniform_logits_give_ln_vocab():
    model = tiny_lm(readout_norm=False)
    batch = token_batch(model)
    with torch.no_grad():
        model.W_head.zero_()
    z = torch.randn(3, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        assert float(model.cost((z,), batch)) == pytest.approx(math.log(11), abs=1e-12)


@torch.no_grad()
def test_readout_norm_makes_the_cost_blind_to_the_scale_of_z():
    model = tiny_lm()
    batch = token_batch(model)
    z = torch.randn(3, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert float(model.cost((z,), batch)) == pytest.approx(float(model.cost((10 * z,), batch)), rel=1e-7)
    plain = tiny_lm(readout_norm=False)
    assert float(plain.cost((z,), batch)) != pytest.approx(float(plain.cost((10 * z,), batch)), rel=1e-3)


def _reverse_mode_cost_gradient(model, batch, z: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    leaf = z.detach().requires_grad_()
    return torch.autograd.grad(factor * model.cost((leaf,), batch), leaf)[0]


@pytest.mark.parametrize("readout_norm", [True, False])
def test_the_written_out_cost_gradient_is_reverse_mode_through_the_cost(readout_norm):
    model = tiny_lm(readout_norm=readout_norm)
    batch = token_batch(model)
    z = torch.randn(3, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = _reverse_mode_cost_gradient(model, batch, z)
    (analytic,) = cost_gradient(model, batch, (z,))
    assert float((analytic - expected).norm() / expected.norm()) <= 1e-13
    assert isinstance(model, DifferentiatesCost) and not analytic.requires_grad


def test_the_cost_gradient_of_a_stack_a_cost_share_and_a_scaled_cost_follow_their_costs():
    """Every wrapper that changes C changes g = ∇ₓC with it: the stack's weighted sum of its members' costs, a
    distributed rank's share of the cost, the conformance kit's k·C."""
    models = [tiny_lm(seed) for seed in (0, 1)]
    batches = [token_batch(m, seed) for seed, m in enumerate(models)]
    stacked = stack(models, nudge_ratios=[1.0, 0.25])
    stacked_batch = stacked.batch(batches)
    z = torch.randn(2, 3, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = _reverse_mode_cost_gradient(stacked, stacked_batch, z)
    (analytic,) = cost_gradient(stacked, stacked_batch, (z,))
    assert isinstance(stacked, DifferentiatesCost) and float(expected[1].norm()) > 0
    assert float((analytic - expected).norm() / expected.norm()) <= 1e-13
    model, batch, z = models[0], batches[0], z[0]
    plain = _reverse_mode_cost_gradient(model, batch, z)
    with cost_share(model, 0.25):
        (shared,) = cost_gradient(model, batch, (z,))
    assert torch.allclose(shared, 0.25 * plain, rtol=1e-12, atol=0)
    (scaled,) = cost_gradient(_ScaledCost(model, 4.0), batch, (z,))
    assert torch.allclose(scaled, 4.0 * plain, rtol=1e-12, atol=0)


def without_conservative(model):
    """The same model without DeclaresConservative: aep then takes F and N at every nudged step."""
    hidden = copy.deepcopy(model)
    hidden.__class__ = type(f"No{type(model).__name__}Conservative", (type(model),), {"conservative": None})
    assert not isinstance(hidden, DeclaresConservative)
    return hidden


def test_aep_without_f_and_n_at_the_nudged_steps_is_the_same_estimate():
    """−∇E(x) + N(x*) + J_Nᵀv − σβ∇ₓC is the field F(x) − σβ∇ₓC − (N(x) − N(x*) − J_Nᵀv) rearranged: the same
    gradient to rounding, on lm, a stack of lm (weighted forces and costs) and cet, with fewer evaluations."""
    from ep_core.models.cet import CET, CETConfig
    from epx_estimators.aep import AEP

    members = [tiny_lm(0, eps=0.1), tiny_lm(1, eps=0.05)]
    stacked = stack(members, nudge_ratios=[1.0, 0.25])
    cet = CET(CETConfig(dim=16, heads=2, head_dim=8, memories=16, T1=60),
              generator=torch.Generator().manual_seed(0)).double()
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    problems = [(members[0], token_batch(members[0])),
                (stacked, stacked.batch([token_batch(m, seed) for seed, m in enumerate(members)])),
                (cet, cet.prepare_batch(images, torch.zeros(2, dtype=torch.long),
                                        generator=torch.Generator().manual_seed(4)))]
    aep = AEP(AEP.Config(T2=30))
    for model, batch in problems:
        assert isinstance(model, DeclaresConservative)
        generic_model = without_conservative(model)
        with counting(model) as fast_calls:
            fast = aep.estimate(model, batch, generator=torch.Generator())
        with counting(generic_model) as generic_calls:
            generic = aep.estimate(generic_model, batch, generator=torch.Generator())
        for name, grad in generic.grads.items():
            assert float(grad.norm()) > 0, name
            gap = float((fast.grads[name] - grad).norm() / grad.norm())
            assert gap < 1e-9, (type(model).__name__, name, gap)
        assert fast_calls["conservative"] == 2 * 30 and generic_calls["conservative"] == 0
        assert fast_calls["force"] == generic_calls["force"] - 2 * 30


def test_embeddings_are_fixed_buffers_unless_learned():
    assert {n for n, _ in tiny_lm().named_parameters()} == {"W_Q", "W_K", "W_V", "W_O", "W_head"}
    learned = tiny_lm(learn_embeddings=True)
    assert learned.parameter_groups()["embedding"] == ["token_embedding", "position_embedding"]
    assert "token_embedding" in dict(learned.named_parameters())


def test_bad_batches_and_missing_vocabulary_are_config_errors():
    model = tiny_lm()
    with pytest.raises(ConfigError, match="vocab"):
        model.prepare_batch(torch.full((2, 12), 11), torch.zeros(2, 12, dtype=torch.long),
                            generator=torch.Generator())
    with pytest.raises(ConfigError, match="context"):
        model.prepare_batch(torch.zeros(2, 13, dtype=torch.long), torch.zeros(2, 13, dtype=torch.long),
                            generator=torch.Generator())
    with pytest.raises(ConfigError, match="vocab"):
        LM(LMConfig(), generator=torch.Generator())


def test_vocabulary_comes_from_the_dataset():
    registry = load()
    sample = make_text_sample()
    model = build_model(registry, "lm", {"context": "8"}, dataset=sample)
    assert model.config.vocab == sample.vocab_size == model.W_head.shape[1]
    batch = build_batch(model, sample, seed=5).batch
    assert batch["tokens"].shape == (16, 8)  # lm's own default batch size
    assert torch.equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])


def test_aep_matches_bptt_when_converged_and_naive_ep_does_not():
    """float64, converged free phase, small β: aep is exact on the non-conservative lm; naive ep is biased."""
    model = tiny_lm(T1=600)
    batch = token_batch(model)
    assert free_phase(model, batch).residual < 1e-10
    registry = load()
    comparison = compare([("ep", build_estimator(registry, "ep", {"beta": "1e-4", "T2": "300"})),
                          ("aep", build_estimator(registry, "aep", {"beta": "1e-4", "T2": "300"}))],
                         model, batch, reference=("bptt", build_estimator(registry, "bptt")), repeats=1)
    aep, ep = comparison.result("aep").metrics, comparison.result("ep").metrics
    assert aep["groups"]["attention"] > 0.9999
    assert all(aep["parameters"][n] > 0.9999 for n in ("W_Q", "W_K", "W_V", "W_O"))
    assert ep["groups"]["attention"] < 0.99
    assert comparison.to_json()["fixed_point"]["stable"]
    # lm evaluates F − N alone (DeclaresConservative): aep's uncapped nudged steps evaluate −∇E, not F or N; N only
    # for J_N at x*
    aep_run, ep_run = comparison.result("aep"), comparison.result("ep")
    assert aep_run.force_evals == ep_run.force_evals - 2 * 300
    assert aep_run.stats["conservative_evals"] == 2 * 300 and aep_run.stats["nonconservative_evals"] == 1


def test_seed_002_comparison_on_real_shakespeare(real_data_dir):
    """A short version of seed 002 on the real text: residual, stability, per-parameter cosines."""
    registry = load()
    text = load_data(registry, "shakespeare", spec=LM.data, data_dir=str(real_data_dir))
    result = run_comparison(registry, ["ep", "aep"], "lm", settings={"aep.clip": "1"},
                            model_settings={"context": "32", "width": "64", "T1": "150"}, dataset=text,
                            batch_size=4, repeats=1).to_json()
    assert result["data"]["name"] == "shakespeare" and result["data"]["vocab_size"] == 65
    assert result["fixed_point"]["stable"] and result["results"][0]["converged"]
    aep = next(r for r in result["results"] if r["label"] == "aep")["metrics"]
    ep = next(r for r in result["results"] if r["label"] == "ep")["metrics"]
    assert aep["groups"]["attention"] > 0.97
    assert aep["groups"]["attention"] > ep["groups"]["attention"] + 0.05


def test_compare_on_lm_prints_stability_and_per_parameter_cosines():
    from click.testing import CliRunner

    from epx_cli.main import cli

    result = CliRunner().invoke(cli, ["compare", "ep", "aep", "--model", "lm", "--data", "sample", "--model-set",
                                      "context=16", "--model-set", "width=32", "--batch-size", "4",
                                      "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "ρ(J_G) = " in result.output and "(stable fixed point)" in result.output
    assert "per-parameter cosine to bptt" in result.output
    assert all(name in result.output for name in ("W_Q", "W_K", "W_V", "W_O"))
    hidden = CliRunner().invoke(cli, ["compare", "ep", "--model", "lm", "--data", "sample", "--model-set",
                                      "context=16", "--model-set", "width=32", "--batch-size", "4",
                                      "--repeats", "1", "--no-per-parameter"])
    assert hidden.exit_code == 0 and "per-parameter cosine" not in hidden.output


def test_gain_bound_is_cached_outside_autograd_and_follows_in_place_updates():
    model = tiny_lm(gain_bound=0.3)
    with torch.no_grad():
        first = model.gain_scale()
        assert model.gain_scale() is first  # one eigendecomposition per parameter version, not per force call
        assert float(first) < 1  # the bound binds here, so the scale depends on W_V and W_O
        model.W_V.mul_(2)  # an in-place update, as an optimizer step makes
        second = model.gain_scale()
    assert second is not first
    value_output = (model.W_V @ model.W_O).detach()
    top = torch.linalg.eigvalsh(0.5 * (value_output + value_output.T))[-1]
    limit = 0.3 * (1 + model.config.s * model.config.c) / model.config.s
    assert float(second) == pytest.approx(float(limit / top), rel=1e-12)
    assert float(second) == pytest.approx(float(first) / 2, rel=1e-9)
    assert model.gain_scale().requires_grad  # under autograd it is part of the graph


def test_bptt_computes_the_gain_bound_once_per_gradient_and_differentiates_through_it(monkeypatch):
    """κ depends on the parameters only: the unrolled free phase carries it in the batch, one eigendecomposition
    per gradient instead of one per step, and its gradient is the per-step one's (checked by finite differences
    of the loss along W_V)."""
    from ep_core.bptt import BPTT

    model = tiny_lm(gain_bound=0.3)
    batch = token_batch(model)
    calls = []
    original = type(model)._top_eigenvector
    monkeypatch.setattr(type(model), "_top_eigenvector", lambda self: calls.append(1) or original(self))
    grads = BPTT().estimate(model, batch, generator=torch.Generator()).grads
    assert len(calls) == 1  # κ's eigenvector, kept for the version of W_V and W_O; κ itself from plain products
    direction = torch.randn(model.W_V.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    step = 1e-6
    with torch.no_grad():
        model.W_V.add_(step * direction)
        up = float(model.loss(batch))
        model.W_V.sub_(2 * step * direction)
        down = float(model.loss(batch))
        model.W_V.add_(step * direction)
    assert (up - down) / (2 * step) == pytest.approx(float((grads["W_V"] * direction).sum()), rel=1e-6)
