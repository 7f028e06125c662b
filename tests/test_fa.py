"""Local layers, localgpt and fa: the backward rules in closed form against direct computations, the exact limit
(transpose feedback with exact LayerNorms is backprop), the feedback state and the conformance kit."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from epx_cli import main as cli_main
from epx_estimators.fa import FA, FAConfig, parse_overrides
from hypothesis import given, settings

from ep_core.bptt import Backprop
from ep_core.config import ConfigError
from ep_core.errors import FileFormatError
from ep_core.harness import gradient_metrics, init_state
from ep_core.layernorm_study import average, decompose, layernorm_decomposition
from ep_core.local import (LN_RULES, BackwardRules, LayerNorm, LayerNormPass, Linear, layernorm_input_gradient,
                           normalise)
from ep_core.models.localgpt import LocalGPTConfig
from ep_core.protocols import LocalModel
from ep_core.testing import check_estimator
from ep_core.testing.strategies import local_models, make_local_problem

TINY = LocalGPTConfig(context=6, layers=2, heads=2, width=8, vocab=7)


def problem(config: LocalGPTConfig = TINY, seed: int = 0):
    return make_local_problem(config, init_seed=seed, batch_size=3, batch_seed=seed + 1)


def fa_estimate(config: FAConfig, model, batch, seed: int = 0):
    rule = FA(config)
    init_state(rule, model, seed=seed)
    return rule.estimate(model, batch, generator=torch.Generator().manual_seed(seed)).grads


def layernorm_with(rule: str, features: int = 6, seed: int = 0):
    """A LayerNorm with random γ, β (so that ∂L/∂z ≠ ∂L/∂y), float64, named 'ln'."""
    layer = LayerNorm(features).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.5 * torch.randn(features, generator=generator, dtype=torch.float64))
        layer.bias.copy_(torch.randn(features, generator=generator, dtype=torch.float64))
    layer.name = "ln"
    return layer, BackwardRules(layernorm={"ln": rule})


@pytest.mark.parametrize("rule", LN_RULES)
def test_each_layernorm_rule_is_its_closed_form_and_gamma_beta_keep_their_true_gradient(rule):
    layer, rules = layernorm_with(rule)
    generator = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(4, 5, 6, generator=generator, dtype=torch.float64) + 2).requires_grad_()
    upstream = torch.randn(4, 5, 6, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad((layer(x, rules) * upstream).sum(), [x, layer.weight, layer.bias])
    exact_layer = F.layer_norm(x, (6,), layer.weight, layer.bias, 1e-5)
    true = torch.autograd.grad((exact_layer * upstream).sum(), [x, layer.weight, layer.bias])
    # Direct computations: g = γ⊙∂L/∂y; the centring matrix P = I − 11ᵀ/d; σ from the variance.
    g = upstream * layer.weight.detach()
    xd = x.detach()
    sigma = (xd.var(dim=-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    z = (xd - xd.mean(dim=-1, keepdim=True)) / sigma
    centring = torch.eye(6, dtype=torch.float64) - 1 / 6
    centred = g @ centring
    radial = z * (g * z).sum(dim=-1, keepdim=True) / 6
    expected = {"exact": (centred - radial) / sigma, "center_scale": centred / sigma,
                "projected": centred - radial, "identity": g}[rule]
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], true[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[2], true[2], rtol=0, atol=1e-12)
    if rule == "exact":
        torch.testing.assert_close(got[0], true[0], rtol=0, atol=1e-10)
    else:
        assert float((got[0] - true[0]).abs().max()) > 1e-3


def test_the_exact_rule_is_the_jacobian_of_the_normalisation():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, generator=generator, dtype=torch.float64)
    g = torch.randn(5, generator=generator, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: normalise(v)[0], x)
    z, sigma = normalise(x)
    torch.testing.assert_close(layernorm_input_gradient("exact", g, z, sigma), jacobian.T @ g, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown LayerNorm backward rule 'exakt'"):
        layernorm_input_gradient("exakt", g, z, sigma)
    with pytest.raises(ValueError, match="valid: exact, center_scale, projected, identity"):
        BackwardRules(layernorm={"ln": "exakt"})


def test_a_feedback_linear_sends_g_through_b_and_keeps_its_own_gradients():
    generator = torch.Generator().manual_seed(3)
    layer = Linear(4, 3, std=0.5, generator=generator).double()
    layer.name = "fc"
    feedback = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    x = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad((layer(x, BackwardRules(feedback={"fc": feedback})) * upstream).sum(),
                              [x, layer.weight, layer.bias])
    true = torch.autograd.grad((layer(x, BackwardRules()) * upstream).sum(), [x, layer.weight, layer.bias])
    torch.testing.assert_close(got[0], upstream @ feedback, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], true[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[2], true[2], rtol=0, atol=1e-12)


def test_the_observer_sees_every_layernorm_with_g_the_gradient_at_z():
    model, batch = problem()
    seen = {}
    rules = BackwardRules(observe=lambda name, data: seen.setdefault(name, data))
    model.local_loss(batch, rules).backward()
    names = [n for n, layer in model.local_layers().items() if isinstance(layer, LayerNorm)]
    assert list(seen) == list(reversed(names))  # the backward pass meets them from the last to the first
    assert names == ["blocks.0.ln_1", "blocks.0.ln_2", "blocks.1.ln_1", "blocks.1.ln_2", "ln_f"]
    data = seen["ln_f"]
    assert data.z.shape == (3, 6, 8) and data.sigma.shape == (3, 6, 1)
    torch.testing.assert_close(data.z.mean(-1), torch.zeros(3, 6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_localgpt_is_causal_groups_every_parameter_once_and_starts_near_uniform():
    for attn in ("softmax", "sigmoid"):
        model, batch = problem(LocalGPTConfig(context=6, layers=2, heads=2, width=8, vocab=7, attn=attn))
        assert isinstance(model, LocalModel)
        grouped = [n for names in model.parameter_groups().values() for n in names]
        assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
        logits = model.logits(batch)
        changed = dict(batch, tokens=batch["tokens"].clone())
        changed["tokens"][:, 4] = (changed["tokens"][:, 4] + 1) % 7
        torch.testing.assert_close(model.logits(changed)[:, :4], logits[:, :4], rtol=0, atol=0)
        assert not torch.equal(model.logits(changed)[:, 4], logits[:, 4])
        assert abs(float(model.loss(batch).detach()) - math.log(7)) < 0.05


@settings(max_examples=25, deadline=None, database=None)
@given(local_models())
def test_transpose_feedback_with_exact_layernorms_is_backprop(problem):
    """The exact limit, on random tiny localgpts in float64: cosine 1 and relative error ≤ 1e-10, every group."""
    model, batch = problem
    estimate = fa_estimate(FAConfig(mode="transpose", ln="exact"), model, batch)
    exact = Backprop().estimate(model, batch, generator=torch.Generator()).grads
    metrics = gradient_metrics(estimate, exact, model.parameter_groups())
    assert metrics["rel_error"] <= 1e-10
    assert all(c is None or c >= 1 - 1e-10 for c in metrics["groups"].values()), metrics["groups"]


def test_surrogates_move_the_gradient_away_from_backprop_and_the_head_stays_exact():
    model, batch = problem(seed=4)
    exact = Backprop().estimate(model, batch, generator=torch.Generator()).grads
    for config in (FAConfig(mode="random"), FAConfig(mode="sign"), FAConfig(mode="transpose", ln="center_scale"),
                   FAConfig(mode="transpose", ln="identity")):
        estimate = fa_estimate(config, model, batch)
        metrics = gradient_metrics(estimate, exact, model.parameter_groups())
        assert metrics["rel_error"] > 1e-3, config
        torch.testing.assert_close(estimate["lm_head.weight"], exact["lm_head.weight"], rtol=0, atol=1e-12)


def test_random_feedback_is_seeded_state_at_the_layers_init_scale():
    model, batch = problem()
    rule = FA()
    init_state(rule, model, seed=0)
    state = rule.state_dict()
    linears = {n: layer for n, layer in model.local_layers().items() if isinstance(layer, Linear)}
    assert list(state) == list(linears) and "lm_head" in state
    for name, layer in linears.items():
        assert state[name].shape == layer.weight.shape
    c_attn = state["blocks.0.attn.c_attn"]
    assert abs(float(c_attn.std()) - 0.02) < 0.004
    assert abs(float(state["blocks.0.mlp.c_proj"].std()) - 0.02 / math.sqrt(4)) < 0.002
    again = FA()
    init_state(again, model, seed=0)
    assert all(torch.equal(state[k], again.state_dict()[k]) for k in state)
    other = FA()
    init_state(other, model, seed=1)
    assert not torch.equal(other.state_dict()["lm_head"], state["lm_head"])
    other.load_state_dict(state)
    torch.testing.assert_close(other.estimate(model, batch, generator=torch.Generator()).grads["wte.weight"],
                               rule.estimate(model, batch, generator=torch.Generator()).grads["wte.weight"],
                               rtol=0, atol=0)
    with pytest.raises(FileFormatError, match="lm_head is"):
        other.load_state_dict({**state, "lm_head": torch.zeros(2, 2)})
    bigger, bigger_batch = problem(LocalGPTConfig(context=6, layers=3, heads=2, width=8, vocab=7))
    with pytest.raises(ConfigError, match="built for another model"):
        rule.estimate(bigger, bigger_batch, generator=torch.Generator())
    with pytest.raises(ConfigError, match="not built yet"):
        FA().estimate(model, batch, generator=torch.Generator())
    sign = FA(FAConfig(mode="sign"))
    init_state(sign, model, seed=0)
    assert sign.state_dict() == {}


def test_per_layer_rules_override_the_default_by_name_or_glob():
    model, _ = problem()
    rules = FA(FAConfig(ln="center_scale", ln_at="ln_f=exact,blocks.1.*=identity")).layernorm_rules(model)
    assert rules == {"blocks.0.ln_1": "center_scale", "blocks.0.ln_2": "center_scale", "blocks.1.ln_1": "identity",
                     "blocks.1.ln_2": "identity", "ln_f": "exact"}
    with pytest.raises(ConfigError, match="'ln_g' matches no LayerNorm of the model; its LayerNorms: blocks.0.ln_1"):
        FA(FAConfig(ln_at="ln_g=exact")).layernorm_rules(model)
    with pytest.raises(ConfigError, match="'exakt' is not a LayerNorm rule"):
        FAConfig(ln_at="ln_f=exakt")
    with pytest.raises(ConfigError, match="LAYER=RULE"):
        FAConfig.from_mapping({"ln_at": "ln_f"})
    assert parse_overrides(" ln_f = exact , ") == (("ln_f", "exact"),)


def test_fa_meets_the_conformance_kit_and_a_wrong_limit_fails_it():
    report = check_estimator(FA, examples=5, raise_on_failure=False)
    assert report.passed, str(report)
    assert {r.name: r.status for r in report.results}["exact_limit"] == "passed"

    class WrongLimit(FA):
        limit_settings = {"mode": "transpose", "ln": "center_scale", "ln_at": ""}

    broken = check_estimator(WrongLimit, examples=5, checks=["exact_limit"], raise_on_failure=False)
    assert not broken.passed and "exact_limit" in broken.results[0].message


def _pass(g: torch.Tensor, x: torch.Tensor) -> LayerNormPass:
    z, sigma = normalise(x)
    return LayerNormPass(z=z, sigma=sigma, g=g)


def test_the_decomposition_in_closed_form():
    generator = torch.Generator().manual_seed(5)
    x = 2 * torch.randn(64, 8, generator=generator, dtype=torch.float64) + 1
    z, _ = normalise(x)
    # A gradient along z alone is all radial; a constant one all mean; one orthogonal to both neither.
    radial = decompose(_pass(z.clone(), x))
    assert radial["r_mean"] < 1e-20 and abs(radial["r_radial"] - 1) < 1e-5
    constant = decompose(_pass(torch.ones(64, 8, dtype=torch.float64), x))
    assert abs(constant["r_mean"] - 1) < 1e-12 and constant["r_radial"] < 1e-20
    noise = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    noise = noise - noise.mean(-1, keepdim=True)
    noise = noise - z * (noise * z).sum(-1, keepdim=True) / (z * z).sum(-1, keepdim=True)
    free = decompose(_pass(noise, x))
    assert free["r_mean"] < 1e-20 and free["r_radial"] < 1e-20
    assert abs(free["cos_identity"] - 1) < 1e-12 and abs(free["cos_center_scale"] - 1) < 1e-12
    mixed = decompose(_pass(torch.randn(64, 8, generator=generator, dtype=torch.float64), x))
    assert 0 < mixed["r_mean"] < 1 and 0 < mixed["r_radial"] < 1 and mixed["r_mean"] + mixed["r_radial"] <= 1
    assert abs(mixed["cos_exact"] - 1) < 1e-12 and abs(mixed["cos_projected"] - 1) < 1e-12
    assert mixed["cos_identity"] < 0.99 and mixed["batch_cos_projected"] < 1 - 1e-6
    sigma = normalise(x)[1]
    assert mixed["sigma_mean"] == pytest.approx(float(sigma.mean()), rel=1e-12)
    assert mixed["sigma_std"] == pytest.approx(float(sigma.std()), rel=1e-12)


def test_layernorm_decomposition_visits_every_layernorm_and_leaves_grads_alone():
    model, batch = problem(seed=2)
    rule = FA()
    init_state(rule, model, seed=0)
    layers = layernorm_decomposition(model, batch, rule.backward_rules(model))
    assert list(layers) == ["blocks.0.ln_1", "blocks.0.ln_2", "blocks.1.ln_1", "blocks.1.ln_2", "ln_f"]
    assert all(p.grad is None for p in model.parameters())
    for row in layers.values():
        assert 0 <= row["r_mean"] <= 1 and 0 <= row["r_radial"] <= 1 and row["r_mean"] + row["r_radial"] <= 1 + 1e-12
        assert abs(row["cos_exact"] - 1) < 1e-12 and -1 <= row["cos_identity"] <= 1
    mean = average(layers)
    assert mean["r_radial"] == pytest.approx(sum(r["r_radial"] for r in layers.values()) / 5, rel=1e-12)


def test_epx_analyze_layernorm_trains_then_decomposes_for_each_attention(tmp_path):
    runner = CliRunner()
    args = ["analyze", "layernorm", "--data", "sample", "--model-set", "layers=1", "--model-set", "width=16",
            "--model-set", "context=16", "--batch-size", "8", "--steps", "3", "--attn", "softmax,sigmoid", "--json",
            "--out", str(tmp_path / "ln.json")]
    result = runner.invoke(cli_main.cli, args)
    assert result.exit_code == 0, result.output
    study = json.loads(result.stdout)
    assert study["format"] == "epx.analysis.layernorm/1" and study["seed"] == 1337 and study["steps"] == 3
    assert set(study["runs"]) == {"softmax", "sigmoid"}
    for kind, run in study["runs"].items():
        assert run["spec"]["model"]["config"]["attn"] == kind and run["spec"]["train"]["lr"] == 1e-3
        assert list(run["layers"]) == ["blocks.0.ln_1", "blocks.0.ln_2", "ln_f"]
        assert run["average"]["r_mean"] == pytest.approx(sum(r["r_mean"] for r in run["layers"].values()) / 3)
        assert run["val_loss"] is not None and 0 < run["val_loss"] < 10
    assert json.loads((tmp_path / "ln.json").read_text()) == study
    bad = runner.invoke(cli_main.cli, ["analyze", "layernorm", "--attn", "softmax,relu", "--data", "sample"])
    assert bad.exit_code == 2 and "unknown attention relu; valid: softmax, sigmoid" in bad.output
    wrong = runner.invoke(cli_main.cli, ["analyze", "layernorm", "--estimator", "backprop", "--data", "sample",
                                         "--steps", "1", "--model-set", "layers=1", "--model-set", "width=8"])
    assert wrong.exit_code == 2 and "does not expose its backward rules" in wrong.output



def test_training_records_each_layernorms_surrogate_cosine_at_every_comparison():
    from ep_core.plugins import load
    from ep_core.train import build_run, train

    def diagnostics(settings: dict[str, str]) -> list[dict]:
        run = build_run(load(), "fa", "localgpt", settings=settings, data="sample", batch_size=4,
                        model_settings={"layers": "1", "width": "8", "heads": "2", "context": "8"},
                        reference="backprop", train_settings={"steps": "4", "diagnose_every": "2", "eval_every": "4"})
        return [r["diagnostic"] for r in train(run) if r["kind"] == "train" and "diagnostic" in r]

    surrogate = diagnostics({"ln": "center_scale", "ln_at": "ln_f=exact"})
    assert [sorted(d["layernorm"]) for d in surrogate] == [["blocks.0.ln_1", "blocks.0.ln_2", "ln_f"]] * 2
    for d in surrogate:
        assert abs(d["layernorm"]["ln_f"] - 1) < 1e-6
        assert all(0 < d["layernorm"][n] < 1 - 1e-6 for n in ("blocks.0.ln_1", "blocks.0.ln_2"))
    assert all(abs(c - 1) < 1e-6 for d in diagnostics({"ln": "exact"}) for c in d["layernorm"].values())
