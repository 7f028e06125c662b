"""check_model: the reference models keep their declared protocols' promises, and a model that breaks one is named."""

from __future__ import annotations

import pytest
import torch

from ep_core.batching import stack
from ep_core.models.cet import CET, CETConfig
from ep_core.models.lm import LM, OUTPUT, LMConfig
from ep_core.models.resmlp import ResMLP, ResMLPConfig
from ep_core.models.toy import Toy, ToyConfig
from ep_core.testing import MODEL_CHECK_NAMES, ConformanceError, check_model

TINY_LM = LMConfig(context=12, width=16, heads=2, vocab=11)


def tiny_lm(cls: type[LM] = LM) -> LM:
    return cls(TINY_LM, generator=torch.Generator().manual_seed(0)).double()


def token_batch(model: LM):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(TINY_LM.vocab, (3, TINY_LM.context + 1), generator=g)
    return model.prepare_batch(tokens[:, :-1], tokens[:, 1:], generator=g)


def small_cet() -> CET:
    return CET(CETConfig(dim=16, heads=2, head_dim=8, memories=16, project=True),
               generator=torch.Generator().manual_seed(0)).double()


def image_batch(model: CET):
    g = torch.Generator().manual_seed(3)
    cfg = model.config
    images = torch.rand(4, cfg.channels, cfg.image, cfg.image, generator=g, dtype=torch.float64)
    return model.prepare_batch(images, torch.zeros(4, dtype=torch.long), generator=g)


def toy(**overrides) -> Toy:
    return Toy(ToyConfig(conservative=False, **overrides), generator=torch.Generator().manual_seed(0)).double()


def toy_batch(model: Toy):
    return model.make_batch(4, generator=torch.Generator().manual_seed(2))


def statuses(report) -> dict[str, str]:
    return {result.name: result.status for result in report.results}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lm_keeps_every_promise_it_declares(dtype):
    model = tiny_lm().to(dtype)
    assert statuses(check_model(model, token_batch(model))) == dict.fromkeys(MODEL_CHECK_NAMES, "passed")


def test_cet_and_the_toy_keep_theirs_and_skip_what_they_do_not_declare():
    model = small_cet()
    found = statuses(check_model(model, image_batch(model)))
    assert found == {**dict.fromkeys(MODEL_CHECK_NAMES, "passed"), "cost_gradient": "skipped"}
    model = toy()
    found = statuses(check_model(model, toy_batch(model)))
    assert found == {**dict.fromkeys(MODEL_CHECK_NAMES, "skipped"), "shapes": "passed", "projection": "passed",
                     "gradient_part": "passed", "conservative": "passed"}


def test_stacks_keep_their_members_promises_with_weighted_forces_and_costs():
    """A stack answers for its members (ep_core.batching): v_i F_i, v_i N_i, w_i ∇C_i."""
    members = [LM(LMConfig(**{**vars(TINY_LM), "eps": eps}), generator=torch.Generator().manual_seed(seed)).double()
               for seed, eps in ((0, 0.1), (1, 0.05))]
    stacked = stack(members, nudge_ratios=[1.0, 0.25])
    assert stacked.step_ratios == [1.0, 0.5]
    found = statuses(check_model(stacked, stacked.batch([token_batch(m) for m in members])))
    assert found == dict.fromkeys(MODEL_CHECK_NAMES, "passed")
    members = [small_cet(), small_cet()]
    stacked = stack(members)
    found = statuses(check_model(stacked, stacked.batch([image_batch(m) for m in members])))
    assert found == {**dict.fromkeys(MODEL_CHECK_NAMES, "passed"), "cost_gradient": "skipped"}


class ForgetsTheNormalisation(LM):
    def cost_gradient(self, state, batch):
        (g,) = super().cost_gradient(state, batch)
        return (g * 1.001,)


class SplitsWrong(LM):
    def split_force(self, state, batch):
        force, (part,) = super().split_force(state, batch)
        return force, (0.5 * part,)


class ForgetsTheDecay(LM):
    """Its gradient part leaves out the damping: aep's uncapped nudged field (−∇E + N(x*) + J_Nᵀv − σβ∇ₓC) would
    relax to a different point than F's."""

    def conservative(self, state, batch):
        (z,) = state
        (part,) = super().conservative(state, batch)
        return (part + z,)


class StaleTerms(LM):
    """Its force without cached terms computes s·κ·W_O differently from its cache (as a cache made before an update
    of W_O would)."""

    def _terms(self, batch):
        terms = super()._terms(batch)
        return terms if OUTPUT in batch else {**terms, OUTPUT: 1.01 * terms[OUTPUT]}


class HidesItsAsymmetry(Toy):
    """Declares N = 0, and so F − N = F, which is not a gradient field."""

    def nonconservative(self, state, batch):
        (x,) = state
        return (torch.zeros_like(x),)

    def conservative(self, state, batch):
        return self.force(state, batch)


class ShrinksOnEveryProjection(Toy):
    def project(self, state):
        return tuple(0.5 * t for t in state)


def lm_like(cls):
    broken = tiny_lm(cls)
    return broken, token_batch(broken)


def toy_like(cls):
    model = cls(ToyConfig(conservative=False), generator=torch.Generator().manual_seed(0)).double()
    return model, toy_batch(model)


@pytest.mark.parametrize("make, failed, says", [
    (lambda: lm_like(ForgetsTheNormalisation), "cost_gradient", "cost_gradient against reverse mode through cost"),
    (lambda: lm_like(SplitsWrong), "split_force", "split_force's N against nonconservative"),
    (lambda: lm_like(ForgetsTheDecay), "conservative", "conservative against force − nonconservative"),
    (lambda: lm_like(StaleTerms), "parameter_terms", "with the cached parameter terms"),
    (lambda: toy_like(HidesItsAsymmetry), "gradient_part", "F − N is not a gradient field"),
    (lambda: toy_like(ShrinksOnEveryProjection), "projection", "Π(Π(x)) against Π(x)"),
], ids=["cost_gradient", "split_force", "conservative", "parameter_terms", "gradient_part", "projection"])
def test_a_broken_promise_fails_its_check_alone_and_says_what_differs(make, failed, says):
    model, batch = make()
    with pytest.raises(ConformanceError, match=failed) as raised:
        check_model(model, batch)
    report = raised.value.report
    assert [r.name for r in report.failures] == [failed]
    assert says in report.failures[0].message


def test_a_model_without_a_fixed_point_is_not_checked():
    model = ResMLP(ResMLPConfig(), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="checks equilibrium models"):
        check_model(model, {})
