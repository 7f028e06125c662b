"""dfa and resmlp: the update rule against hand-computed quantities, its state, and its place in the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from epx_cli import main as cli_main
from epx_estimators.dfa import DFA, teaching_signal

from ep_core.bptt import Backprop
from ep_core.errors import ConfigError, FileFormatError
from ep_core.harness import gradient_metrics, init_state
from ep_core.models.resmlp import ResMLP, ResMLPConfig
from ep_core.testing import check_estimator
from ep_core.testing.strategies import make_residual_problem

SMALL = ResMLPConfig(dim=8, blocks=3, hidden=6, channels=1, image=4, classes=5)


def problem(seed: int = 0, batch_size: int = 6):
    return make_residual_problem(SMALL, init_seed=seed, batch_size=batch_size, batch_seed=seed + 1)


def estimate(rule: DFA, model, batch, seed: int = 0):
    init_state(rule, model, seed=seed)
    return rule.estimate(model, batch, generator=torch.Generator().manual_seed(seed)).grads


def test_the_penalty_adds_exactly_two_lambda_over_b_times_the_branch_vjp():
    model, batch = problem()
    lam = 0.37
    rule, plain = DFA(DFA.Config(lam=lam)), DFA()
    penalised, unpenalised = estimate(rule, model, batch), estimate(plain, model, batch)
    hidden = model.forward_hidden(batch)[0]
    size = batch["labels"].shape[0]
    for index, block in enumerate(model.blocks):
        branch = block(hidden[index].detach())
        names = [f"blocks.{index}.{name}" for name, _ in block.named_parameters()]
        expected = torch.autograd.grad(branch, list(block.parameters()), grad_outputs=2 * lam * branch / size)
        for name, target in zip(names, expected):
            assert float((penalised[name] - unpenalised[name] - target).abs().max()) < 1e-10, name
            assert float(target.abs().max()) > 1e-4, "the test needs a penalty gradient that is not ~0"
    for name in ("embedding.weight", "out_norm.weight", "head.bias"):
        assert torch.equal(penalised[name], unpenalised[name])


def test_each_block_gets_its_own_local_loss_and_the_readout_the_true_gradient():
    """Computed together, the gradients equal those of each local loss taken alone."""
    model, batch = problem(seed=3)
    rule = DFA(DFA.Config(lam=0.1))
    grads = estimate(rule, model, batch, seed=3)
    hidden, logits = model.forward_hidden(batch)
    error = (logits.softmax(-1) - F.one_hot(batch["labels"], model.classes)).detach()
    for index, block in enumerate(model.blocks):
        signal = teaching_signal(error, rule.feedback[index])
        branch = block(hidden[index].detach())
        local = (branch * signal).sum(-1).mean() + 0.1 * branch.pow(2).sum(-1).mean()
        for (name, _), g in zip(block.named_parameters(), torch.autograd.grad(local, list(block.parameters()))):
            torch.testing.assert_close(grads[f"blocks.{index}.{name}"], g, rtol=1e-12, atol=1e-14)
    embedding = (model.embed(batch["inputs"]) * teaching_signal(error, rule.feedback[0])).sum(-1).mean()
    for (name, _), g in zip(model.embedding.named_parameters(),
                            torch.autograd.grad(embedding, list(model.embedding.parameters()))):
        torch.testing.assert_close(grads[f"embedding.{name}"], g, rtol=1e-12, atol=1e-14)
    exact = Backprop().estimate(model, batch, generator=torch.Generator()).grads
    readout = model.parameter_groups()["readout"]
    metrics = gradient_metrics(grads, exact, {"readout": readout})
    assert metrics["groups"]["readout"] > 1 - 1e-12
    for name in readout:
        torch.testing.assert_close(grads[name], exact[name], rtol=1e-10, atol=1e-12)


def test_feedback_is_seeded_state_of_the_right_scale_and_round_trips():
    model, _ = problem()
    rule = DFA()
    with pytest.raises(ConfigError, match="call init"):
        rule.state_dict()
    init_state(rule, model, seed=5)
    state = rule.state_dict()
    assert set(state) == {"B0", "B1", "B2"} and state["B0"].shape == (8, 5)
    again = DFA()
    init_state(again, model, seed=5)
    assert all(torch.equal(state[k], again.state_dict()[k]) for k in state)
    big = ResMLP(ResMLPConfig(dim=256, blocks=4, classes=10), generator=torch.Generator().manual_seed(0))
    init_state(again, big, seed=0)
    entries = torch.cat([b.flatten() for b in again.state_dict().values()])
    assert float(entries.std()) == pytest.approx(10 ** -0.5, rel=0.02)
    with pytest.raises(FileFormatError, match="B0"):
        rule.load_state_dict({**state, "B0": torch.zeros(3, 5)})


def test_a_dfa_whose_penalty_has_the_wrong_sign_fails_its_declared_property():
    class WrongSign(DFA):
        name = "wrong-sign-dfa"

        def estimate(self, model, batch, *, generator):
            """ĝ(0) − (ĝ(λ) − ĝ(0)): the penalty subtracted instead of added."""
            result = super().estimate(model, batch, generator=generator)
            plain = DFA(self.config.replace(lam=0.0))
            plain.feedback = self.feedback
            base = plain.estimate(model, batch, generator=generator).grads
            result.grads = {k: 2 * base[k] - v for k, v in result.grads.items()}
            return result

    report = check_estimator(WrongSign(WrongSign.Config(lam=0.1)), examples=3, raise_on_failure=False)
    failed = {r.name: r.message for r in report.results if r.status == "failed"}
    assert list(failed) == ["declared_properties"]
    assert "penalty_gradient does not hold" in failed["declared_properties"]
    assert check_estimator(DFA(DFA.Config(lam=0.1)), examples=3, raise_on_failure=False).passed


@pytest.fixture
def epx():
    cli_main.registry.cache_clear()
    runner = CliRunner()
    yield lambda *args: runner.invoke(cli_main.cli, list(args))
    cli_main.registry.cache_clear()


def test_compare_dfa_with_backprop_on_fashion_mnist(epx, real_data_dir):
    result = epx("compare", "dfa", "--ref", "backprop", "--model", "resmlp", "--data", "fashionmnist", "--data-dir",
                 str(real_data_dir), "--batch-size", "32", "--repeats", "1", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["reference"] == "backprop"
    dfa = next(r for r in data["results"] if r["label"] == "dfa")
    assert dfa["metrics"]["groups"]["readout"] >= 0.9999
    assert set(dfa["metrics"]["groups"]) == {"embed", "block0", "block1", "block2", "block3", "readout"}


def test_dfa_on_an_equilibrium_model_is_a_usage_error(epx):
    result = epx("compare", "dfa", "bptt", "--model", "cet", "--data", "sample")
    assert result.exit_code == 2
    assert "dfa needs a ResidualModel; cet is not one" in result.stderr


def test_residual_stream_diagnostics_match_their_definitions():
    from ep_core.residual_stream import residual_stream

    model, batch = problem(seed=2)
    stream = residual_stream(model, batch)
    with torch.no_grad():
        hidden, logits = model.forward_hidden(batch)
    norms = [h.norm(dim=-1) for h in hidden]
    assert stream["h_L_norm"] == pytest.approx(float(norms[-1].median()))
    assert stream["growth"] == pytest.approx([float((b / a).median()) for a, b in zip(norms, norms[1:])])
    assert stream["max_growth"] == max(stream["growth"]) and stream["probe_layer"] == 2
    h = [model.embed(batch["inputs"]).detach().requires_grad_()]
    for block in model.blocks:
        h.append(h[-1] + block(h[-1]))
    (g2,) = torch.autograd.grad(F.cross_entropy(model.readout(h[-1]), batch["labels"]), [h[2]])
    assert stream["grad_norm"] == pytest.approx(float(g2.norm(dim=-1).median()))
    assert stream["accuracy"] == pytest.approx(float((logits.argmax(-1) == batch["labels"]).double().mean()))


def test_an_exploded_stream_makes_the_comparison_not_meaningful():
    from ep_core.harness import compare
    from ep_core.residual_stream import meaningless
    from epx_cli.render import comparison_notes, comparison_table
    from rich.console import Console

    assert meaningless({"max_growth": 2.0, "h_L_norm": 1.0}, 1e-9) == [
        "the reference gradient has collapsed (norm 1.0e-09 < 1e-07)"]
    model, batch = problem(seed=4)
    healthy = compare([("dfa", DFA())], model, batch, reference=("backprop", Backprop()), repeats=1).to_json()
    assert healthy["meaningful"] is True and healthy["residual_stream"]["not_meaningful"] == []
    with torch.no_grad():
        for block in model.blocks:
            block.fc2.weight.mul_(1e4)
            block.fc2.bias.mul_(1e4)
    meta = {"model": {"name": "resmlp", "config": model.config.to_dict()}, "data": {"name": "random"}}
    exploded = compare([("dfa", DFA())], model, batch, reference=("backprop", Backprop()), repeats=1,
                       meta=meta).to_json()
    assert exploded["meaningful"] is False
    assert "the residual stream has exploded" in exploded["residual_stream"]["not_meaningful"][0]
    console = Console(width=200, record=True)
    console.print(comparison_table(exploded))
    text = " ".join(console.export_text().split())
    assert text.count(" ?") == 1 + len(model.parameter_groups())  # every cosine of dfa, none of the reference
    assert "cosines NOT meaningful" in text
    assert any("are not meaningful" in note for note in comparison_notes(exploded))


def test_info_says_which_estimators_keep_state(epx):
    assert "state: kept between estimates" in " ".join(epx("info", "dfa").stdout.split())
    assert "state:" not in epx("info", "aep").stdout


def test_resmlp_standardises_its_inputs_with_the_training_statistics_and_cet_does_not(real_data_dir):
    """Seed 004's transforms.Normalize: resmlp's batches of Fashion-MNIST have mean ≈ 0 and std ≈ 1 per channel;
    cet's stay in [0, 1]; the comparison records which."""
    from ep_core.plugins import load
    from ep_core.seeding import DATA_STREAM, MASK_STREAM, generator
    from ep_core.session import build_model, draw_batch, load_data, run_comparison

    registry = load()
    data = load_data(registry, "fashionmnist", spec=ResMLP.data, data_dir=str(real_data_dir))
    model = build_model(registry, "resmlp", dataset=data)
    x = draw_batch(model, data, 8192, data=generator(0, DATA_STREAM), mask=generator(0, MASK_STREAM))["inputs"]
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02
    raw, _ = data.batch(8192, generator=generator(0, DATA_STREAM))
    assert 0 <= float(raw.min()) and float(raw.max()) <= 1
    torch.testing.assert_close(x, ((raw - 0.2860) / 0.3530).flatten(1), rtol=0, atol=1e-6)
    for name, expected in (("resmlp", True), ("cet", False)):
        described = run_comparison(registry, ["backprop"], name, reference="backprop", data="fashionmnist",
                                   data_dir=str(real_data_dir), batch_size=8, repeats=1).meta["data"]
        assert described["normalized"] is expected
        assert described["normalization"] == {"mean": [0.2860], "std": [0.3530]}
