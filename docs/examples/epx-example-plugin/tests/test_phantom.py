"""epx-phantom's tests: epx's conformance suite, then the properties that make phantom a phantom gradient."""

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ep_core.bptt import BPTT
from ep_core.plugins import load
from ep_core.relax import add, cost_gradient, free_phase, inner, parameter_gradient, relaxation_map, scale
from ep_core.testing import parametrize_with_checks, run_estimate
from ep_core.testing.strategies import models, seeds
from epx_phantom.plugin import Phantom

Adjoint = load().get("estimator", "adjoint").factory
FEW = settings(max_examples=8, deadline=None, database=None)


def flat(grads):
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def relative_error(grads, reference):
    return float((flat(grads) - flat(reference)).norm() / flat(reference).norm())


# One pytest test per (estimator, check): the default config, and a short damped one.
@parametrize_with_checks([Phantom, Phantom(Phantom.Config(steps=3, damping=0.5))], examples=4)
def test_epx_conformance(estimator, check):
    check(estimator)


def test_found_through_its_entry_point(epx_registry):
    assert epx_registry.get("estimator", "phantom").factory is Phantom
    record = epx_registry.plugin("phantom")
    assert (record.distribution, record.status, record.registered) == ("epx-phantom", "ok", ["estimator:phantom"])


@FEW
@given(models(), seeds(), st.floats(0.5, 1.0))
def test_many_steps_equal_the_adjoint_gradient(problem, seed, damping):
    """k → ∞: the Neumann series sums to the implicit gradient, for any damping (λ < 1 only needs more steps)."""
    model, batch = problem
    steps = math.ceil(400 / damping)
    phantom = run_estimate(Phantom(Phantom.Config(steps=steps, damping=damping)), model, batch, seed=seed)
    adjoint = run_estimate(Adjoint(Adjoint.Config(Tadj=steps)), model, batch, seed=seed)
    assert relative_error(phantom.grads, adjoint.grads) < 1e-6


@FEW
@given(models(), seeds(), st.floats(0.05, 1.0))
def test_one_step_is_the_first_neumann_term(problem, seed, damping):
    """k = 1: ĝ = λ(∂G/∂θ)ᵀ∇ₓC(x₁) + ∂C/∂θ, with x₁ = (1 − λ)x* + λG(x*)."""
    model, batch = problem
    x_star = free_phase(model, batch).state
    G = relaxation_map(model, batch)
    with torch.no_grad():
        x1 = add(scale(x_star, 1 - damping), G(x_star), damping)
    g = cost_gradient(model, batch, x1)
    by_hand = parameter_gradient(model, lambda: damping * inner(g, G(x_star)) + model.cost(x1, batch))
    phantom = run_estimate(Phantom(Phantom.Config(steps=1, damping=damping)), model, batch, seed=seed)
    assert relative_error(phantom.grads, by_hand) < 1e-10


@settings(max_examples=4, deadline=None, database=None)
@given(st.lists(models(), min_size=4, max_size=4))
def test_error_to_bptt_shrinks_with_k(problems):
    """The truncation error falls like ρ(J_G)^k: on average over converged toys it shrinks at every k."""
    errors = []
    for model, batch in problems:
        reference = run_estimate(BPTT(), model, batch)
        assume(reference.equilibrium.residual < 1e-8)
        errors.append([relative_error(run_estimate(Phantom(Phantom.Config(steps=k)), model, batch).grads,
                                      reference.grads) for k in (1, 4, 16, 64)])
    mean = torch.tensor(errors).mean(dim=0)
    assert all(mean[1:] < mean[:-1]), f"mean relative error over k = 1, 4, 16, 64: {mean.tolist()}"
