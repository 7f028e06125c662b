"""Batched problems (ep_core.batching): N models of one configuration stacked into one give each member's own
estimate and residual; the runner stacks a group only when the estimator declares it treats problems
independently; on CUDA a stacked group is one graph whose per-member numbers are those of separate runs. The CUDA
tests are skipped without a GPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from epx_estimators.adjoint import Adjoint
from epx_estimators.aep import AEP, AEPConfig
from epx_estimators.ep import EP, EPConfig

from ep_core.batching import member_residuals, nudge_ratios, split, stack, stack_batches
from ep_core.bptt import BPTT
from ep_core.capture import Runner, eager_estimate
from ep_core.harness import gradient_metrics
from ep_core.models.cet import CET, CETConfig
from ep_core.models.lm import LM, LMConfig
from ep_core.models.toy import Toy, ToyConfig
from ep_core.protocols import CachesParameterTerms, DeclaresNonconservative, DivergenceError, EquilibriumModel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def lm(seed: int, device: str = "cpu", dtype=torch.float64, **settings):
    model = LM(LMConfig(**{"vocab": 11, "context": 12, "width": 16, "heads": 2, "T1": 40, **settings}),
               generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    tokens = torch.randint(0, 11, (3, 13), generator=torch.Generator().manual_seed(100 + seed))
    return model, model.prepare_batch(tokens[:, :-1], tokens[:, 1:], generator=torch.Generator())


def cet(seed: int, device: str = "cpu", dtype=torch.float64, **settings):
    model = CET(CETConfig(**{"dim": 16, "heads": 2, "head_dim": 8, "memories": 16, "T1": 40, **settings}),
                generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(100 + seed), dtype=dtype)
    batch = model.prepare_batch(images, torch.zeros(4), generator=torch.Generator().manual_seed(seed))
    return model, {k: v.to(device) for k, v in batch.items()}


def toy(seed: int, device: str = "cpu", dtype=torch.float64, **settings):
    model = Toy(ToyConfig(**{"conservative": False, **settings}), generator=torch.Generator().manual_seed(seed))
    model = model.to(device=device, dtype=dtype)
    batch = model.make_batch(8, generator=torch.Generator().manual_seed(seed))
    return model, {k: v.to(device) for k, v in batch.items()}


MODELS = {"lm": lm, "cet": cet, "toy": toy}
STACKED_TOLERANCE = {"lm": 1e-8, "toy": 1e-8, "cet": 1e-6}
"""The largest relative difference, in float64, between a stacked member's estimate and its own. cet's 40 steps
end far from its fixed point (residual ≈ 2), where its dynamics amplify rounding: ep at s = 1, c = 2 differs by
9.8e-9 on a 2-core CI machine and 1.1e-8 on an H200 host's CPU (bptt: 5e-15)."""
ESTIMATORS = {"ep": EP(), "aep": AEP(), "bptt": BPTT()}


def largest_relative_difference(a, b) -> float:
    assert a.grads.keys() == b.grads.keys()
    return max(float((a.grads[n] - b.grads[n]).abs().max() / b.grads[n].abs().max().clamp_min(1e-30))
               for n in b.grads)


def relative_error(a, b) -> float:
    """‖a − b‖ / ‖b‖ over all of the gradient's entries."""
    difference = sum(float((a.grads[n] - b.grads[n]).pow(2).sum()) for n in b.grads)
    return (difference / sum(float(b.grads[n].pow(2).sum()) for n in b.grads)) ** 0.5


def in_float64(model, batch):
    as64 = copy.deepcopy(model).double()
    return as64, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def problems(make, seeds=(0, 1, 2), **kwargs):
    pairs = [make(seed, **kwargs) for seed in seeds]
    return [model for model, _ in pairs], [batch for _, batch in pairs]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("label", list(ESTIMATORS))
def test_a_stack_gives_each_members_own_estimate_and_residual(model_name, label):
    models, batches = problems(MODELS[model_name])
    estimator = ESTIMATORS[label]
    stacked = stack(models)
    batch = stacked.batch(batches)
    joint = eager_estimate(estimator, stacked, batch, generator=torch.Generator())
    residuals = member_residuals(stacked, batch, joint.equilibrium.state)
    members = split(joint, [float(r) for r in residuals])
    alone = [eager_estimate(estimator, m, b, generator=torch.Generator()) for m, b in zip(models, batches)]
    for member, single in zip(members, alone):
        assert largest_relative_difference(member, single) <= STACKED_TOLERANCE[model_name]
        assert member.equilibrium.residual == pytest.approx(single.equilibrium.residual, rel=1e-9)
        assert member.equilibrium.steps == single.equilibrium.steps
        for x, y in zip(member.equilibrium.state, single.equilibrium.state):
            assert torch.allclose(x, y, rtol=0, atol=1e-12)
    # Each member's gradient is its own, not a mixture: the seeds' gradients differ.
    assert largest_relative_difference(members[0], members[1]) > 1e-2


@pytest.mark.parametrize("model_name", ["lm", "cet"])
@pytest.mark.parametrize("label", list(ESTIMATORS))
def test_models_differing_in_their_knobs_stack_each_with_its_own_values(model_name, label):
    """One seed (the same parameters and batch) at three (s, c): grid points of a sweep over the knobs."""
    knobs = [{"s": 0.25, "c": 1.0}, {"s": 0.5, "c": 0.3}, {"s": 1.0, "c": 2.0}]
    pairs = [MODELS[model_name](0, **values) for values in knobs]
    models, batches = [model for model, _ in pairs], [batch for _, batch in pairs]
    estimator = ESTIMATORS[label]
    stacked = stack(models)
    joint = eager_estimate(estimator, stacked, stacked.batch(batches), generator=torch.Generator())
    members = split(joint, [None] * len(models))
    for member, model, batch in zip(members, models, batches):
        alone = eager_estimate(estimator, model, batch, generator=torch.Generator())
        assert largest_relative_difference(member, alone) <= STACKED_TOLERANCE[model_name]
    assert largest_relative_difference(members[0], members[2]) > 1e-2
    assert Runner([(estimator, model) for model in models]).batchable(batches)


@pytest.mark.parametrize("model_name", ["lm", "toy"])
@pytest.mark.parametrize("make", [lambda beta: EP(EPConfig(beta=beta)), lambda beta: AEP(AEPConfig(beta=beta)),
                                  lambda beta: EP(EPConfig(beta=beta, centered=False))],
                         ids=["ep", "aep", "ep-one-sided"])
def test_estimators_differing_in_their_nudge_stack_each_at_its_own_beta(model_name, make):
    """One seed at three β: the stack runs at β₀ with the costs weighted β_i/β₀, each estimate divided back."""
    models, batches = problems(MODELS[model_name], seeds=(0, 0, 1))
    betas = (0.02, 0.005, 0.05)
    estimators = [make(beta) for beta in betas]
    weights = nudge_ratios(estimators)
    assert weights == pytest.approx([1.0, 0.25, 2.5])
    stacked = stack(models, nudge_ratios=weights)
    joint = eager_estimate(estimators[0], stacked, stacked.batch(batches), generator=torch.Generator())
    members = split(joint, [None] * 3, stacked.cost_weights)
    for member, estimator, model, batch in zip(members, estimators, models, batches):
        alone = eager_estimate(estimator, model, batch, generator=torch.Generator())
        assert largest_relative_difference(member, alone) <= STACKED_TOLERANCE[model_name]
    assert largest_relative_difference(members[0], members[1]) > 1e-6          # same problem, another β
    runner = Runner([(estimator, model) for estimator, model in zip(estimators, models)])
    assert runner.batchable(batches)
    assert not Runner([(EP(EPConfig(beta=0.02)), models[0]), (EP(EPConfig(beta=0.02, T2=5)), models[1])]).batchable(
        batches[:2])
    assert nudge_ratios([BPTT(), BPTT()]) is None and nudge_ratios(estimators[:1] * 2) is None


class StepBoundEP(EP):
    """ep that does not declare its estimate scales with the force."""

    force_homogeneous = False


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("label", list(ESTIMATORS))
def test_models_differing_in_their_step_size_stack_each_at_its_own_eps(model_name, label):
    """One seed at three ε (and, for ep and aep, three β): the stack steps by ε₀ with member i's force and cost
    scaled by v_i = ε_i/ε₀, its cost also by u_i = β_i/β₀, and divides member i's estimate by u_i·v_i."""
    base = {"lm": 0.1, "cet": 0.2, "toy": 0.2}[model_name]
    # 30 steps, short of convergence (the toy's 300 converge it), so that ε changes the estimate.
    pairs = [MODELS[model_name](0, eps=base * ratio, T1=30) for ratio in (1.0, 0.5, 0.75)]
    models, batches = [model for model, _ in pairs], [batch for _, batch in pairs]
    estimators = ([BPTT()] * 3 if label == "bptt" else
                  [type(ESTIMATORS[label])(ESTIMATORS[label].config.replace(beta=beta)) for beta in (0.02, 0.01, 0.04)])
    stacked = stack(models, nudge_ratios=nudge_ratios(estimators))
    assert stacked.step_ratios == pytest.approx([1.0, 0.5, 0.75])
    expected_weights = [1.0, 0.5, 0.75] if label == "bptt" else [1.0, 0.25, 1.5]
    assert stacked.cost_weights == pytest.approx(expected_weights)
    batch = stacked.batch(batches)
    joint = eager_estimate(estimators[0], stacked, batch, generator=torch.Generator())
    residuals = member_residuals(stacked, batch, joint.equilibrium.state)
    members = split(joint, [float(r) for r in residuals], stacked.cost_weights)
    for member, estimator, model, one in zip(members, estimators, models, batches):
        alone = eager_estimate(estimator, model, one, generator=torch.Generator())
        assert largest_relative_difference(member, alone) <= STACKED_TOLERANCE[model_name]
        assert member.equilibrium.residual == pytest.approx(alone.equilibrium.residual, rel=1e-9)
    assert largest_relative_difference(members[0], members[1]) > 1e-6          # same problem, another ε
    assert Runner(list(zip(estimators, models))).batchable(batches)


def test_step_sizes_stack_only_for_an_estimator_that_scales_with_the_force():
    models, batches = problems(toy, seeds=(0, 0))
    other = Toy(dataclasses.replace(models[0].config, eps=0.1), generator=torch.Generator().manual_seed(0)).double()
    assert Runner([(EP(), models[0]), (EP(), other)]).batchable(batches)
    assert not Runner([(StepBoundEP(), models[0]), (StepBoundEP(), other)]).batchable(batches)
    assert Runner([(StepBoundEP(), models[0]), (StepBoundEP(), models[1])]).batchable(batches)
    assert stack(models).step_ratios is None and stack(models).cost_weights is None
    assert stack([models[0], other]).step_ratios == pytest.approx([1.0, 0.5])


def test_knobs_stack_only_where_they_agree_on_being_zero_and_are_held_exactly():
    (on, batch), (off, _) = lm(0, s=1.0), lm(0, s=0.0)
    with pytest.raises(ValueError, match="stacked_knobs"):
        stack([on, off])
    assert not Runner([(EP(), on), (EP(), off)]).batchable([batch, batch])
    with pytest.raises(ValueError, match="share a type, a configuration"):
        stack([on, lm(0, s=0.5, T1=20)[0]])                        # T1 is not a stacked knob
    model = LM(LMConfig(vocab=11, context=12, width=16, heads=2, s=0.3, c=0.7),
               generator=torch.Generator().manual_seed(0)).to(torch.float64)
    assert model.knob_s.item() == 0.3 and model.knob_c.item() == 0.7
    assert not any(key.startswith("knob_") for key in model.state_dict())


def test_a_stack_keeps_the_members_protocols_names_and_reads_their_updates():
    models, batches = problems(lm)
    stacked = stack(models)
    assert isinstance(stacked, EquilibriumModel) and isinstance(stacked, DeclaresNonconservative)
    assert isinstance(stacked, CachesParameterTerms) and len(stacked) == 3
    toys, _ = problems(toy)
    assert not isinstance(stack(toys), CachesParameterTerms)
    assert {name.removeprefix("problems.") for name, _ in stacked.named_parameters()} == \
        {name for name, _ in models[0].named_parameters()}
    assert stacked.problems.W_V.shape == (3, *models[0].W_V.shape)
    batch = stacked.batch(batches)
    with torch.no_grad():
        models[1].W_V.mul_(2.0)
    stale = eager_estimate(EP(), stacked, batch, generator=torch.Generator())
    stacked.load(batches, into=batch)
    fresh = split(eager_estimate(EP(), stacked, batch, generator=torch.Generator()), [None] * 3)
    alone = eager_estimate(EP(), models[1], batches[1], generator=torch.Generator())
    assert largest_relative_difference(fresh[1], alone) <= 1e-8
    assert largest_relative_difference(split(stale, [None] * 3)[1], alone) > 1e-2


def test_only_alike_models_and_batches_stack():
    models, batches = problems(lm)
    other, _ = lm(3, T1=41)
    with pytest.raises(ValueError, match="share a type, a configuration"):
        stack([models[0], other])
    with pytest.raises(ValueError, match="share a type, a configuration"):
        stack([models[0], cet(0)[0]])
    with pytest.raises(ValueError, match="same keys"):
        stack_batches([batches[0], {"tokens": batches[1]["tokens"]}])
    short = {key: value[:2] for key, value in batches[1].items()}
    with pytest.raises(ValueError, match="one shape"):
        stack_batches([batches[0], short])


def test_the_runner_stacks_a_group_only_where_the_estimator_treats_problems_independently():
    models, batches = problems(lm)

    def runner(estimator, group=models):
        return Runner([(estimator, model) for model in group])

    assert runner(EP()).batchable(batches) and runner(BPTT()).batchable(batches)
    assert runner(AEP()).batchable(batches)
    assert not runner(AEP(AEPConfig(clip=1.0))).batchable(batches)        # the clip compares whole-state norms
    assert not runner(Adjoint()).batchable(batches)                       # declares nothing: not Batchable
    anderson, _ = problems(lm, solver="anderson")
    assert not runner(EP(), anderson).batchable(batches)                  # stops on a whole-state residual
    assert not runner(EP(), models[:1]).batchable(batches[:1])            # one problem: nothing to stack
    assert not Runner([(EP(), models[0]), (AEP(), models[1])]).batchable(batches[:2])
    short = {key: value[:2] for key, value in batches[2].items()}
    assert not runner(EP()).batchable([batches[0], batches[1], short])


@cuda
@pytest.mark.parametrize("model_name", ["lm", "cet"])
@pytest.mark.parametrize("label", list(ESTIMATORS))
def test_a_stacked_graph_gives_each_problem_the_numbers_of_its_own_run(model_name, label):
    models, batches = problems(MODELS[model_name], seeds=range(4), device="cuda", dtype=torch.float32)
    estimator = ESTIMATORS[label]
    runner = Runner([(estimator, model) for model in models], stacking=True)
    generators = [torch.Generator("cuda") for _ in models]
    first = runner.run(batches, generators)
    assert runner.mode == "stacked"
    again = runner.run(batches, generators)
    for member, repeat, model, batch in zip(first, again, models, batches):
        alone = Runner((estimator, model), eager=True)(batch, generator=torch.Generator("cuda"))
        assert all(torch.equal(member.grads[n], repeat.grads[n]) for n in member.grads)
        if model_name == "lm":
            metrics = gradient_metrics(member.grads, alone.grads, model.parameter_groups())
            assert metrics["cosine"] >= 1 - 1e-5 and abs(metrics["norm_ratio"] - 1) <= 1e-3, metrics
            assert largest_relative_difference(member, alone) <= 1e-4
        else:
            # cet's ep and aep amplify rounding about 1e5-fold (stacked against separate in float64: 2e-10, lm's
            # 1e-15): in float32 a stacked and a separate estimate differ by up to 1e-2 (an H200: 9e-3), and
            # each is as far from the float64 estimate as the other (there: 1.8x at most).
            exact = eager_estimate(estimator, *in_float64(model, batch), generator=torch.Generator("cuda"))
            assert relative_error(member, exact) <= 3 * relative_error(alone, exact) + 1e-6
        assert isinstance(member.equilibrium.residual, float)
        assert member.equilibrium.residual == pytest.approx(alone.equilibrium.residual, rel=1e-3, abs=1e-7)


@cuda
def test_a_stacked_replay_sees_updates_and_a_diverging_member_is_named_with_its_exact_step():
    models, batches = problems(lm, seeds=range(3), device="cuda", dtype=torch.float32, gain_bound=None)
    runner = Runner([(EP(), model) for model in models], stacking=True)
    generators = [torch.Generator("cuda") for _ in models]
    runner.run(batches, generators)
    with torch.no_grad():
        models[2].W_V.mul_(1.5)
    updated = runner.run(batches, generators)
    assert runner.mode == "stacked"
    alone = Runner((EP(), models[2]), eager=True)(batches[2], generator=torch.Generator("cuda"))
    assert largest_relative_difference(updated[2], alone) <= 1e-4
    with torch.no_grad():
        models[1].W_V.mul_(1e3)
    with pytest.raises(DivergenceError) as info:
        runner.run(batches, generators)
    from ep_core.relax import relaxation_map
    G = relaxation_map(models[1], batches[1])
    with torch.no_grad():
        x, step = models[1].init_state(batches[1]), 0
        while all(torch.isfinite(xi).all() for xi in x):
            x, step = G(x), step + 1
    assert info.value.phase == "free" and info.value.step == step
