"""The conformance kit: the contract every epx estimator meets, as named checks run on problems Hypothesis draws.

    from ep_core.testing import check_estimator, parametrize_with_checks

    def test_my_rule():
        check_estimator(MyRule)              # a class (built from its default config) or an instance

    @parametrize_with_checks([MyRule, MyRule(MyRule.Config(k=3))])
    def test_epx_conformance(estimator, check):   # one pytest test per (estimator, check)
        check(estimator)

Each check is a small named function ``check_<name>(estimator, data, context)`` that draws its problem with
``data.draw(...)`` inside ``@given(st.data())``, so Hypothesis shrinks a failure to a small problem and prints
the draws (``make_toy_problem(...)``, which rebuilds it) in the failure message. The checks an estimator gets
depend on what it declares:

===========================  =====  ==================================================================
check                        suite  what it asserts
===========================  =====  ==================================================================
declarations                 1      ``name``, a default-constructible ``Config``, ``requires``, ``exact_limit``,
                                    a valid ``conformance_limit``, an instance ``config``
gradient_for_every_parameter 1      one gradient per named parameter, and none for other names
gradient_shape_dtype_device  1      each gradient has its parameter's shape, dtype and device
finite_gradients             1      no NaN or inf
model_untouched              1      parameters, buffers and train/eval mode bit-identical after ``estimate``
param_grad_untouched         1      ``param.grad`` neither written nor changed
deterministic                1      two runs with generators of the same seed: bit-identical gradients
exact_limit                  1, 3   with a ``conformance_limit``, on problems inside the limit and with the
                                    config moved toward it (``limit_settings``): cosine to bptt ≥ 0.999
                                    (suite 1), and relative error ||ĝ − g||/||g|| ≤ 0.01, so the norm ratio
                                    ||ĝ||/||g|| within 1% too (suite 3: a gradient of the right direction
                                    but the wrong size is not exact)
cost_scaling                 2      with a ``conformance_limit``: the gradient of k·C is k times the gradient
                                    of C (cosine ≥ 0.999, norm within 1%) at the limit config
valid_configs                2      any config inside the declared ranges gives finite gradients or a clear
                                    ``EpxError`` (e.g. a diverged relaxation), never another exception
state_round_trip             4      for a stateful estimator (``init``, ``state_dict``, ``load_state_dict``):
                                    the state is tensors, restores bit-identical gradients, and a state of
                                    the wrong shape is refused with an ``EpxError``
declared_properties          4      every function in the estimator's ``properties`` holds on the problems
stacked_problems             5      for a ``Batchable`` estimator: its estimate of two problems stacked
                                    (``ep_core.batching``) is each problem's own, to 1e-8 in float64; for a
                                    ``StacksNudge`` one, with the second problem at half the nudge; for a
                                    ``ForceHomogeneous`` one, at 0.75 of the step size
===========================  =====  ==================================================================

Problems are drawn for the model protocol the estimator requires: tiny converging toys for an
``EquilibriumModel`` (or plain ``Model``) estimator, tiny residual MLPs for a ``ResidualModel`` one, tiny
localgpts for a ``LocalModel`` one. A stateful
estimator gets its state built from each problem's model and seed before it is run.

``conformance_limit`` is ``"conservative"`` (exact on conservative models at a converged stable fixed point),
``"any-stable"`` (at any converged stable fixed point), ``"always"`` (on every problem: a feed-forward model has
no fixed point to converge to; fa at ``mode=transpose``, ``ln=exact``) or ``None`` (no exact limit: the
numerical checks are skipped). An estimator may set ``limit_settings`` (a dict of config changes that move it
toward its limit); otherwise :data:`LIMIT_SETTINGS` (``beta=1e-3``, ``T2=100``, for the fields its config has) is used.

The suite is versioned (:data:`SUITE_VERSION`). ``check_estimator(..., suite=N)`` pins a plugin to version N:
checks added after N still run, but their failures are reported as warnings, so a new epx release does not
fail a plugin's CI without notice; moving the pin up makes them count. A check strengthened after N
(``exact_limit`` in suite 3) runs as suite N had it, where a failure fails; if that passes, it runs once more
with only the newer assertions (the magnitude), whose failure is a warning. Pinned, ``exact_limit`` therefore
takes twice as long.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from ep_core.batching import nudge_ratios, split, stack, stacks_step_size
from ep_core.bptt import BPTT
from ep_core.config import Config
from ep_core.harness import CONVERGED_TOL, gradient_metrics, init_state
from ep_core.protocols import (Batch, Batchable, EpxError, GradientEstimate, StacksNudge, StacksStepSize,
                               StatefulEstimator)
from ep_core.relax import cost_gradient, scale
from ep_core.testing import strategies

SUITE_VERSION = 5

LIMITS = ("conservative", "any-stable", "always")
LIMIT_SETTINGS: dict[str, Any] = {"beta": 1e-3, "T2": 100}
"""Config changes that move an estimator toward its exact limit; only fields the config has are changed.
The kit's toys contract by at most ≈ 0.94 per step, so 100 nudged steps settle to a relative 2e-3 (measured on
the slowest toys: ep and aep reach cosine 1 − 5e-8, far above ``MIN_COSINE``)."""
MIN_COSINE = 0.999
MAX_REL_ERROR = 1e-2
"""The largest ||ĝ − g||/||g|| to bptt that ``exact_limit`` accepts at the limit config; since
|1 − ||ĝ||/||g||| ≤ ||ĝ − g||/||g||, the norm ratio is within it too. Measured on 1000 of the kit's draws each
(``strategies.models``; conservative toys for ep) at :data:`LIMIT_SETTINGS`: the worst relative error is
1.0e-3 for ep and 7.7e-5 for aep, nearly all of it in the norm (their worst 1 − cosine is 5e-8): on the slowest
toys (coupling 0.7, ≈ 0.94 per step) 100 nudged steps stop short of the nudged fixed point by ≈ 0.94^100 = 2e-3.
adjoint reaches 5e-12 (1.9e-10 with solver=gmres) and phantom at steps=400 5e-12. One-sided nudging
(``centered=False``) adds an O(β) bias, again in the norm (ratios below 1 only): 3.0e-3 for ep, 1.7e-3 for aep.
1e-2 is three times the worst of these, and fails a gradient scaled by a constant outside [0.99, 1.01]."""
_MAGNITUDE_SINCE = 3


def _name(estimator: Any) -> str:
    cls = estimator if isinstance(estimator, type) else type(estimator)
    return str(getattr(cls, "name", cls.__qualname__))


def _fail(estimator: Any, message: str) -> NoReturn:
    raise AssertionError(f"epx conformance: {_name(estimator)}: {message}")


def as_estimator(estimator: Any) -> Any:
    """An instance: ``estimator`` itself, or the class built from its default config."""
    return estimator(estimator.Config()) if isinstance(estimator, type) else estimator


def conformance_limit(estimator: Any) -> str | None:
    """The exact limit the kit samples for ``estimator`` (class or instance): its ``conformance_limit``."""
    cls = estimator if isinstance(estimator, type) else type(estimator)
    limit = getattr(cls, "conformance_limit", None)
    if limit is not None and limit not in LIMITS:
        raise ValueError(f"{_name(cls)}.conformance_limit is {limit!r}; valid: {', '.join(LIMITS)} or None")
    return limit


def at_limit(estimator: Any, settings: Mapping[str, Any] = LIMIT_SETTINGS) -> Any:
    """A copy of ``estimator`` with ``settings`` applied to the config fields it has (itself if none)."""
    fields = estimator.config.to_dict()
    changes = {key: value for key, value in settings.items() if key in fields}
    return type(estimator)(estimator.config.replace(**changes)) if changes else estimator


def run_estimate(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0,
                 fresh_state: bool = True) -> GradientEstimate:
    """``estimator.estimate`` with a fresh generator seeded by ``seed`` on the model's device; a stateful
    estimator first gets its state built from the model and ``seed`` (unless ``fresh_state`` is false)."""
    if fresh_state:
        init_state(estimator, model, seed=seed)
    device = next(model.parameters()).device
    result = estimator.estimate(model, batch, generator=torch.Generator(device=device).manual_seed(seed))
    if not isinstance(result, GradientEstimate):
        _fail(estimator, f"estimate() returned {type(result).__name__}, not a GradientEstimate")
    return result


# --- the rules, one function each ---------------------------------------------------------------------------

def check_declarations(estimator: Any) -> None:
    """Rule 1: the attributes the registry, the CLI and the harness rely on (class or instance)."""
    cls = estimator if isinstance(estimator, type) else type(estimator)
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        _fail(cls, "needs a class attribute `name` (a non-empty str)")
    config_cls = getattr(cls, "Config", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, Config)):
        _fail(cls, "needs a class attribute `Config`, a subclass of ep_core.config.Config")
    try:
        config_cls()
    except Exception as exc:  # noqa: BLE001 - reported as the violation it is
        _fail(cls, f"its Config() is not valid with the defaults: {exc}")
    if not isinstance(getattr(cls, "requires", None), type):
        _fail(cls, "needs a class attribute `requires` (the model protocol it needs, e.g. EquilibriumModel)")
    if not isinstance(getattr(cls, "exact_limit", None), str):
        _fail(cls, "needs a class attribute `exact_limit` (a str saying when the estimate is exact)")
    if not callable(getattr(cls, "estimate", None)):
        _fail(cls, "needs a method estimate(model, batch, *, generator)")
    config = getattr(as_estimator(estimator), "config", None)
    if not isinstance(config, config_cls):
        _fail(cls, f"`config` must be a {config_cls.__name__}, got {type(config).__name__}")
    conformance_limit(cls)
    declared = getattr(cls, "limit_settings", None)
    if declared is not None:
        fields = set(config.to_dict())
        unknown = sorted(set(declared) - fields)
        if unknown:
            _fail(cls, f"limit_settings names {unknown}, which its Config does not have (fields: "
                       f"{', '.join(sorted(fields))}); the kit would leave them unchanged")
        try:
            config.replace(**declared)
        except Exception as exc:  # noqa: BLE001 - reported as the violation it is
            _fail(cls, f"limit_settings {dict(declared)} are not a valid config: {exc}")


def check_gradient_names(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> None:
    """One gradient per named parameter of the model, and none for other names."""
    estimate = run_estimate(estimator, model, batch, seed=seed)
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(estimate.grads)), sorted(set(estimate.grads) - set(params))
    if missing:
        _fail(estimator, f"no gradient for parameters {missing}")
    if extra:
        _fail(estimator, f"gradients for names that are not parameters of the model: {extra}")


def check_gradient_shapes(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> None:
    """Each gradient is a tensor with its parameter's shape, dtype and device."""
    estimate = run_estimate(estimator, model, batch, seed=seed)
    for name, p in model.named_parameters():
        g = estimate.grads.get(name)
        if g is None:
            continue  # check_gradient_names reports it
        if not isinstance(g, torch.Tensor):
            _fail(estimator, f"the gradient of {name!r} is a {type(g).__name__}, not a tensor")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            _fail(estimator, f"the gradient of {name!r} is {tuple(g.shape)} {g.dtype} on {g.device}; "
                             f"the parameter is {tuple(p.shape)} {p.dtype} on {p.device}")


def check_finite_gradients(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> None:
    """No NaN or inf in any gradient."""
    for name, g in run_estimate(estimator, model, batch, seed=seed).grads.items():
        bad = int((~torch.isfinite(g)).sum()) if isinstance(g, torch.Tensor) else 0
        if bad:
            _fail(estimator, f"the gradient of {name!r} has {bad} non-finite entries of {g.numel()}")


def check_model_untouched(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> None:
    """Parameters, buffers and train/eval mode are bit-identical after ``estimate``."""
    before = {key: value.detach().clone() for key, value in model.state_dict().items()}
    training = model.training
    run_estimate(estimator, model, batch, seed=seed)
    after = model.state_dict()
    if set(after) != set(before):
        _fail(estimator, f"changed the model's parameters/buffers: {sorted(set(after) ^ set(before))}")
    changed = [key for key, value in before.items() if not torch.equal(after[key], value)]
    if changed:
        _fail(estimator, f"changed the model: {changed} differ after estimate()")
    if model.training != training:
        _fail(estimator, "switched the model between train and eval mode")


def check_param_grad_untouched(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> None:
    """``param.grad`` is neither written nor changed.

    Every other parameter gets a sentinel ``.grad`` for the run (the rest ``None``), so that writing a fresh
    gradient and changing an existing one are both caught; the original ``.grad`` values are put back after.
    """
    params = list(model.named_parameters())
    original_grads = [p.grad for _, p in params]
    try:
        for i, (_, p) in enumerate(params):
            p.grad = torch.full_like(p, 0.125) if i % 2 == 0 else None
        sentinels = {name: None if p.grad is None else p.grad.clone() for name, p in params}
        run_estimate(estimator, model, batch, seed=seed)
        for name, p in params:
            if sentinels[name] is None and p.grad is not None:
                _fail(estimator, f"set {name}.grad, which was None; estimators return gradients in "
                                 f"GradientEstimate.grads and never write param.grad")
            if sentinels[name] is not None and (p.grad is None or not torch.equal(p.grad, sentinels[name])):
                _fail(estimator, f"changed {name}.grad; estimators never touch param.grad")
    finally:
        for (_, p), grad in zip(params, original_grads):
            p.grad = grad


def check_deterministic(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> None:
    """Two runs with generators seeded by ``seed`` give bit-identical gradients."""
    first = run_estimate(estimator, model, batch, seed=seed)
    second = run_estimate(estimator, model, batch, seed=seed)
    if set(first.grads) != set(second.grads):
        _fail(estimator, "two runs with the same seed returned gradients for different parameters")
    for name, g in first.grads.items():
        if not torch.equal(g, second.grads[name]):
            gap = float((g.double() - second.grads[name].double()).abs().max())
            _fail(estimator, f"not deterministic: two runs with generators seeded {seed} gave different "
                             f"gradients for {name!r} (max |difference| {gap:.3g}); draw randomness only "
                             f"from `generator`")


def check_exact_limit(estimator: Any, model: torch.nn.Module, batch: Batch, *, min_cosine: float = MIN_COSINE,
                      max_rel_error: float = MAX_REL_ERROR, settings: Mapping[str, Any] = LIMIT_SETTINGS,
                      seed: int = 0, reference: GradientEstimate | None = None) -> dict[str, Any]:
    """The estimate equals bptt's gradient on one problem, with the config moved toward the estimator's limit:
    cosine ≥ ``min_cosine`` and relative error ≤ ``max_rel_error`` (hence |1 − norm ratio| ≤ it too).

    The caller picks a problem inside the estimator's limit (see :func:`conformance_limit`); its free phase
    must have converged. ``max_rel_error=math.inf`` checks the direction alone, as suites 1 and 2 did;
    ``min_cosine=-math.inf`` the magnitude alone. Returns :func:`ep_core.harness.gradient_metrics` of the
    estimate against bptt.
    """
    if reference is None:
        reference = run_estimate(BPTT(), model, batch, seed=seed)
    residual = reference.equilibrium.residual if reference.equilibrium is not None else None
    if residual is not None and not residual <= CONVERGED_TOL:
        raise ValueError(f"the free phase of this problem has not converged (residual {residual} > "
                         f"{CONVERGED_TOL:g}); an exact limit holds only at a fixed point: raise T1")
    limited = at_limit(estimator, settings)
    metrics = gradient_metrics(run_estimate(limited, model, batch, seed=seed).grads, reference.grads,
                               model.parameter_groups())
    cosine, rel_error, ratio = metrics["cosine"], metrics["rel_error"], metrics["norm_ratio"]
    if cosine is None:
        raise ValueError("the bptt gradient of this problem is zero, so no cosine is defined")
    direction_ok, size_ok = cosine >= min_cosine, rel_error <= max_rel_error
    if not (direction_ok and size_ok):
        per_parameter = ", ".join(f"{n} {c:.4f}" if c is not None else f"{n} n/a"
                                  for n, c in metrics["parameters"].items())
        cosine_text = f"cosine {cosine:.6f}" + ("" if direction_ok else f" < {min_cosine}")
        error_text = f"rel error {rel_error:.4f}" + ("" if size_ok else f" > {max_rel_error:g}")
        ratio_text = f"norm ratio {ratio:.4f}" + (f" (|1 − ratio| > {max_rel_error:g})"
                                                  if abs(1 - ratio) > max_rel_error else "")
        _fail(estimator, f"exact_limit: declares itself exact in the limit {conformance_limit(estimator)!r}, but "
                         f"its gradient is not bptt's: {cosine_text}, {error_text}, {ratio_text} with config "
                         f"{limited.config.to_dict()} (cosine per parameter: {per_parameter})")
    return metrics


# --- the named checks ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """What every check draws from and compares against."""

    models: Callable[..., st.SearchStrategy]
    """``models(conservative=None | bool)``: a strategy of problems (``model, batch = problem``)."""
    min_cosine: float = MIN_COSINE
    max_rel_error: float = MAX_REL_ERROR
    limit_settings: Mapping[str, Any] | None = None
    suite: int = SUITE_VERSION
    newer_than: int = 0
    """With ``suite``: a check makes the assertions added in the suites newer_than + 1 … suite."""

    def asserts(self, since: int) -> bool:
        """Whether an assertion added in suite ``since`` is made."""
        return self.newer_than < since <= self.suite

    def problem(self, data: st.DataObject, conservative: bool | None = None) -> Any:
        return data.draw(self.models(conservative=conservative), label="problem")


def _draw(data: st.DataObject, context: Context, conservative: bool | None = None) -> tuple[Any, Batch, int]:
    problem = context.problem(data, conservative)
    model, batch = problem
    return model, batch, data.draw(strategies.seeds(), label="seed")


def _draw_in_limit(estimator: Any, data: st.DataObject, context: Context) -> tuple[Any, Batch, int]:
    """A problem inside the estimator's declared limit: conservative models only for "conservative"."""
    conservative = True if conformance_limit(estimator) == "conservative" else None
    return _draw(data, context, conservative)


def _limit_settings(estimator: Any, context: Context) -> Mapping[str, Any]:
    if context.limit_settings is not None:
        return context.limit_settings
    return getattr(type(estimator), "limit_settings", LIMIT_SETTINGS)


def _run_declarations(estimator: Any, data: st.DataObject, context: Context) -> None:
    check_declarations(estimator)


def _on_a_problem(rule: Callable[..., None]) -> Callable[[Any, st.DataObject, Context], None]:
    """A check that draws a problem and a seed, then applies ``rule`` to them."""
    def run(estimator: Any, data: st.DataObject, context: Context) -> None:
        model, batch, seed = _draw(data, context)
        rule(estimator, model, batch, seed=seed)
    return run


def _run_exact_limit(estimator: Any, data: st.DataObject, context: Context) -> None:
    model, batch, seed = _draw_in_limit(estimator, data, context)
    reference = run_estimate(BPTT(), model, batch, seed=seed)
    # Only a converged free phase has an exact limit, and a zero gradient has no direction to compare.
    assume(reference.equilibrium is None or reference.equilibrium.residual <= CONVERGED_TOL)
    assume(any(bool(g.any()) for g in reference.grads.values()))
    check_exact_limit(estimator, model, batch, min_cosine=context.min_cosine if context.asserts(1) else -math.inf,
                      max_rel_error=context.max_rel_error if context.asserts(_MAGNITUDE_SINCE) else math.inf,
                      settings=_limit_settings(estimator, context), seed=seed, reference=reference)


class _ScaledCost:
    """``model`` with its cost multiplied by ``factor``; everything else, parameters included, is the model's."""

    def __init__(self, model: torch.nn.Module, factor: float):
        self._model, self._factor = model, factor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def cost(self, state: Any, batch: Batch) -> torch.Tensor:
        return self._factor * self._model.cost(state, batch)

    def cost_gradient(self, state: Any, batch: Batch) -> Any:
        return scale(cost_gradient(self._model, batch, state), self._factor)

    def loss(self, batch: Batch) -> torch.Tensor:
        return self._factor * self._model.loss(batch)

    def local_loss(self, batch: Batch, rules: Any) -> torch.Tensor:
        return self._factor * self._model.local_loss(batch, rules)


def check_cost_scaling(estimator: Any, model: torch.nn.Module, batch: Batch, *, factor: float, seed: int = 0,
                       min_cosine: float = MIN_COSINE) -> None:
    """The estimate for the cost k·C is k times the estimate for C (cosine ≥ ``min_cosine``, norm within 1%).

    True of every estimator in its exact limit, since the exact gradient is linear in C; a rule that normalises
    its update, or whose nudging does not scale with the cost, fails it. Apply it at the limit config.
    """
    plain = run_estimate(estimator, model, batch, seed=seed).grads
    scaled = run_estimate(estimator, _ScaledCost(model, factor), batch, seed=seed).grads
    metrics = gradient_metrics(scaled, {name: factor * g for name, g in plain.items()}, model.parameter_groups())
    if metrics["cosine"] is None:
        return  # a zero gradient scales trivially
    if not (metrics["cosine"] >= min_cosine and abs(metrics["norm_ratio"] - 1) <= 0.01):
        _fail(estimator, f"the gradient of {factor:g}·C is not {factor:g} times the gradient of C: cosine "
                         f"{metrics['cosine']:.6f}, norm ratio {metrics['norm_ratio']:.4f} (config "
                         f"{estimator.config.to_dict()})")


def _run_cost_scaling(estimator: Any, data: st.DataObject, context: Context) -> None:
    model, batch, seed = _draw_in_limit(estimator, data, context)
    factor = data.draw(st.sampled_from([0.25, 4.0]), label="factor")
    check_cost_scaling(at_limit(estimator, _limit_settings(estimator, context)), model, batch, factor=factor,
                       seed=seed, min_cosine=context.min_cosine)


def check_state_round_trip(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> None:
    """A stateful estimator's ``state_dict`` is tensors; loaded into an estimator whose state was built from another
    seed, it gives bit-identical gradients; a state of the wrong shape is refused with an EpxError."""
    first = run_estimate(estimator, model, batch, seed=seed)
    state = estimator.state_dict()
    if not state or not all(isinstance(t, torch.Tensor) for t in state.values()):
        _fail(estimator, f"state_dict() must be a non-empty dict of tensors, got {state!r:.200}")
    saved = {key: tensor.clone() for key, tensor in state.items()}
    other = type(estimator)(estimator.config)
    init_state(other, model, seed=seed + 1)
    other.load_state_dict(saved)
    second = run_estimate(other, model, batch, seed=seed, fresh_state=False)
    for name, g in first.grads.items():
        if not torch.equal(g, second.grads[name]):
            _fail(estimator, f"after load_state_dict(state_dict()) the gradient of {name!r} differs: the state "
                             f"does not hold everything the estimate depends on")
    key = next(iter(saved))
    try:
        other.load_state_dict({**saved, key: torch.zeros(*saved[key].shape, 2)})
    except EpxError:
        return
    except Exception as exc:  # noqa: BLE001 - the violation being checked for
        _fail(estimator, f"load_state_dict of a state with a wrong shape raised {type(exc).__name__}: {exc}; raise "
                         f"an EpxError naming what does not fit")
    _fail(estimator, "load_state_dict accepted a state whose tensors have the wrong shape")


def check_declared_properties(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> None:
    """Every property the estimator declares (``properties``: functions ``(estimator, model, batch, seed)`` that
    raise AssertionError when the property does not hold) holds on the problem; a stateful estimator gets its state
    built for the problem first."""
    init_state(estimator, model, seed=seed)
    for prop in type(estimator).properties:
        try:
            prop(estimator, model, batch, seed)
        except AssertionError as exc:
            _fail(estimator, f"its declared property {prop.__name__} does not hold: {exc}")


def _run_valid_configs(estimator: Any, data: st.DataObject, context: Context) -> None:
    config = data.draw(strategies.configs(type(estimator)), label="config")
    model, batch, seed = _draw(data, context)
    candidate = type(estimator)(config)
    try:
        estimate = run_estimate(candidate, model, batch, seed=seed)
    except EpxError:
        return  # a clear, expected failure (e.g. divergence for an aggressive config)
    except Exception as exc:  # noqa: BLE001 - the violation being checked for
        _fail(estimator, f"with the valid config {config.to_dict()} estimate() raised {type(exc).__name__}: "
                         f"{exc}; raise an ep_core.protocols.EpxError (or a subclass) for expected failures")
    broken = [name for name, g in estimate.grads.items() if not bool(torch.isfinite(g).all())]
    if broken:
        _fail(estimator, f"with the valid config {config.to_dict()} the gradients of {broken} are not finite "
                         f"and no EpxError was raised")


STACKED_TOLERANCE = 1e-8
"""The largest difference between a stacked problem's estimate and its own, relative to its largest entry, that
``stacked_problems`` accepts: in float64 the built-ins differ by rounding only (ep, aep, bptt on the kit's toys:
below 1e-13), while a mixture of the problems, or a nudge not undone, differs by O(1)."""


def check_stacked_problems(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> None:
    """A Batchable estimator treats problems independently: its estimate of ``model`` stacked with a copy whose
    parameters are scaled by 0.9 (:func:`ep_core.batching.stack`) is each problem's own estimate. A StacksNudge
    estimator runs the copy at half its nudge (the stack at the first one's, with cost weights); a
    ForceHomogeneous one, on a model that declares its step size (StacksStepSize), at 0.75 of the step size."""
    if not estimator.batchable(model):
        return  # not declared for this model and configuration
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(0.9)
    step_size = stacks_step_size(estimator) and isinstance(model, StacksStepSize)
    if step_size:
        step_field = type(model).step_size_field
        other.config = replace(model.config, **{step_field: getattr(model.config, step_field) * 0.75})
    estimators = [estimator, estimator]
    if isinstance(estimator, StacksNudge):
        nudge = type(estimator).nudge_field
        halved = {nudge: getattr(estimator.config, nudge) / 2}
        estimators[1] = type(estimator)(estimator.config.replace(**halved))
    try:
        stacked = stack([model, other], nudge_ratios=nudge_ratios(estimators))
        joint = run_estimate(estimator, stacked, stacked.batch([batch, batch]), seed=seed)
    except EpxError:
        raise
    except Exception as exc:  # noqa: BLE001 — any failure to run on a stack breaks the declaration
        _fail(estimator, f"declares Batchable but could not estimate two stacked problems: {type(exc).__name__}: "
                         f"{exc}")
    members = split(joint, [None, None], stacked.cost_weights)
    declared = [" or does not scale with the nudge as StacksNudge says"] if estimators[1] is not estimator else []
    if step_size:
        declared.append(" or does not scale with the force as ForceHomogeneous says (problem 2 at "
                        f"{step_field}={getattr(other.config, step_field):g})")
    for index, (member, own, problem) in enumerate(zip(members, estimators, (model, other))):
        alone = run_estimate(own, problem, batch, seed=seed).grads
        for name, grad in alone.items():
            scale = float(grad.abs().max()) or 1.0
            difference = float((member.grads[name] - grad).abs().max()) / scale
            if not difference <= STACKED_TOLERANCE:
                _fail(estimator, f"declares Batchable, but stacked with another problem, problem {index + 1}'s "
                                 f"gradient of {name!r} differs from its own by {difference:.2e} of its largest "
                                 f"entry (> {STACKED_TOLERANCE:g}; config {own.config.to_dict()}): the estimate "
                                 "mixes the problems (a norm or mean over the whole state)"
                                 + "".join(declared if index else []))


def _without_batchable(estimator: Any) -> str | None:
    return None if isinstance(estimator, Batchable) else "does not declare Batchable"


def _without_limit(estimator: Any) -> str | None:
    return None if conformance_limit(estimator) is not None else "no conformance_limit declared"


def _without_state(estimator: Any) -> str | None:
    return None if isinstance(estimator, StatefulEstimator) else "keeps no state between estimates"


def _without_properties(estimator: Any) -> str | None:
    return None if getattr(type(estimator), "properties", ()) else "declares no properties"


@dataclass(frozen=True)
class Check:
    name: str
    since: int
    run: Callable[[Any, st.DataObject, Context], None]
    skip: Callable[[Any], str | None] | None = None
    """Why the check does not apply to an estimator (it is then skipped), or None when it does."""
    draws: bool = True
    strengthened: int = 0
    """The suite that last added assertions to the check (0: none after ``since``)."""

    def __call__(self, estimator: Any, **options: Any) -> None:
        """Run this check alone, as :func:`parametrize_with_checks`' tests do, and tell pytest the outcome: a
        failure raises, a check that does not apply is skipped, an expected failure is xfailed, and a failure of a
        check (or of assertions) newer than the pinned suite, or an expected failure that passed, is a warning."""
        import warnings

        import pytest

        report = check_estimator(estimator, checks=[self.name], raise_on_failure=False, **options)
        result = report.results[0]
        if result.status == "failed":
            raise AssertionError(result.message)
        if result.status == "skipped":
            pytest.skip(result.message)
        if result.status == "xfail":
            pytest.xfail(result.message)
        if result.status in ("warning", "xpass"):
            warnings.warn(f"epx conformance {self.name}: {result.message}", UserWarning, stacklevel=2)


CHECKS: tuple[Check, ...] = (
    Check("declarations", 1, _run_declarations, draws=False),
    Check("gradient_for_every_parameter", 1, _on_a_problem(check_gradient_names)),
    Check("gradient_shape_dtype_device", 1, _on_a_problem(check_gradient_shapes)),
    Check("finite_gradients", 1, _on_a_problem(check_finite_gradients)),
    Check("model_untouched", 1, _on_a_problem(check_model_untouched)),
    Check("param_grad_untouched", 1, _on_a_problem(check_param_grad_untouched)),
    Check("deterministic", 1, _on_a_problem(check_deterministic)),
    Check("exact_limit", 1, _run_exact_limit, skip=_without_limit, strengthened=_MAGNITUDE_SINCE),
    Check("cost_scaling", 2, _run_cost_scaling, skip=_without_limit),
    Check("valid_configs", 2, _run_valid_configs),
    Check("state_round_trip", 4, _on_a_problem(check_state_round_trip), skip=_without_state),
    Check("declared_properties", 4, _on_a_problem(check_declared_properties), skip=_without_properties),
    Check("stacked_problems", 5, _on_a_problem(check_stacked_problems), skip=_without_batchable),
)
CHECK_NAMES = tuple(check.name for check in CHECKS)


@dataclass
class CheckResult:
    name: str
    status: str
    """"passed", "failed", "xfail" (failed, and expected to), "xpass" (expected to fail, but passed),
    "warning" (failed, but the check or the failed assertions are newer than the pinned suite) or "skipped"
    (does not apply)."""
    message: str = ""
    seconds: float = 0.0


@dataclass
class ConformanceReport:
    estimator: str
    """The estimator's name, or the model's for :func:`ep_core.testing.check_model`."""
    suite: int
    results: list[CheckResult] = field(default_factory=list)
    title: str = ""
    """What was checked, for the report's first line; empty: the conformance suite."""

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def heading(self) -> str:
        return self.title or f"epx conformance suite {self.suite}"

    def __str__(self) -> str:
        lines = [f"{self.heading} for {self.estimator}:"]
        for r in self.results:
            lines.append(f"  {r.name:30} {r.status:8} {r.seconds:6.2f} s" + (f"  {r.message}" if r.message else ""))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "suite": self.suite, "title": self.heading, "passed": self.passed,
                "results": [vars(r) for r in self.results]}


class ConformanceError(AssertionError):
    """Raised by :func:`check_estimator` when a check failed; ``report`` has every result."""

    def __init__(self, report: ConformanceReport):
        messages = "\n\n".join(f"[{r.name}] {r.message}" for r in report.failures)
        super().__init__(f"{len(report.failures)} check(s) failed for {report.estimator}:\n{messages}")
        self.report = report


def _message(exc: BaseException) -> str:
    """The violation, and the draws Hypothesis reports for the (shrunk) falsifying example; an exception other
    than an assertion is named."""
    notes = [n for n in getattr(exc, "__notes__", []) if n.startswith("Draw ") or "Falsifying" in n]
    text = str(exc) + ("\n" + "\n".join(notes) if notes else "")
    return text if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {text}"


def check_estimator(estimator: Any, *, models: Callable[..., st.SearchStrategy] | None = None,
                    expected_failed_checks: Mapping[str, str] | None = None, checks: Iterable[str] | None = None,
                    examples: int = 10, suite: int | None = None, min_cosine: float = MIN_COSINE,
                    max_rel_error: float = MAX_REL_ERROR, limit_settings: Mapping[str, Any] | None = None,
                    derandomize: bool = True,
                    shrink: bool = True, raise_on_failure: bool = True) -> ConformanceReport:
    """Run the conformance checks on ``estimator`` and return a :class:`ConformanceReport`.

    ``estimator`` is a class (built from its default config) or an instance. ``models(conservative=...)``
    returns a strategy of problems (default :func:`ep_core.testing.strategies.models`); ``checks`` restricts the
    run to some check names; ``expected_failed_checks`` maps check names to the reason they are known to fail
    (reported as "xfail"); ``suite`` pins the suite version (module docstring); ``min_cosine`` and
    ``max_rel_error`` are the tolerances of ``exact_limit`` (``min_cosine`` also of ``cost_scaling``). Each
    drawing check runs on ``examples`` problems; ``derandomize`` draws the same ones on every run, as CI wants;
    ``shrink`` lets Hypothesis shrink a failure to a small problem before reporting it. Raises
    :class:`ConformanceError` when a check failed, unless ``raise_on_failure`` is false.
    """
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    suite = SUITE_VERSION if suite is None else suite
    if not 1 <= suite <= SUITE_VERSION:
        raise ValueError(f"suite must be between 1 and {SUITE_VERSION}, got {suite}")
    expected = dict(expected_failed_checks or {})
    selected = list(CHECK_NAMES if checks is None else checks)
    unknown = sorted((set(selected) | set(expected)) - set(CHECK_NAMES))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; valid: {', '.join(CHECK_NAMES)}")
    requires = getattr(estimator if isinstance(estimator, type) else type(estimator), "requires", None)
    default_models = (functools.partial(strategies.models, protocol=requires) if isinstance(requires, type)
                      else strategies.models)
    context = Context(models=models or default_models, min_cosine=min_cosine, max_rel_error=max_rel_error,
                      limit_settings=limit_settings, suite=suite)
    report = ConformanceReport(_name(estimator), suite)
    instance: Any = None
    for check in CHECKS:
        if check.name not in selected:
            continue
        started = time.perf_counter()
        result = CheckResult(check.name, "passed")
        try:
            if check.name != "declarations":
                if instance is None:
                    check_declarations(estimator)
                    instance = as_estimator(estimator)
                reason = check.skip(instance) if check.skip is not None else None
                if reason is not None:
                    result.status, result.message = "skipped", reason
                    report.results.append(result)
                    continue
            target = estimator if instance is None else instance
            _run_check(check, target, context, examples=examples, derandomize=derandomize, shrink=shrink)
            if check.strengthened > suite:
                try:
                    _run_check(check, target, replace(context, suite=SUITE_VERSION, newer_than=suite),
                               examples=examples, derandomize=derandomize, shrink=shrink)
                except Exception as exc:  # noqa: BLE001 - reported as the warning it is
                    result.status = "warning"
                    result.message = (f"strengthened in suite {check.strengthened} (pinned to {suite}): "
                                      f"{_message(exc)}")
        except Exception as exc:  # noqa: BLE001 - an estimator that raises has failed the check
            result.status, result.message = "failed", _message(exc)
        if result.status in ("failed", "warning") and check.name in expected:
            result.status, result.message = "xfail", f"{expected[check.name]} ({result.message.splitlines()[0]})"
        elif result.status == "passed" and check.name in expected:
            result.status, result.message = "xpass", f"expected to fail ({expected[check.name]}) but passed"
        elif result.status == "failed" and check.since > suite:
            result.status = "warning"
            result.message = f"new in suite {check.since} (pinned to {suite}): {result.message}"
        result.seconds = time.perf_counter() - started
        report.results.append(result)
        if check.name == "declarations" and result.status == "failed":
            break  # nothing else can run on an estimator that cannot be built
    if raise_on_failure and not report.passed:
        raise ConformanceError(report)
    return report


def _run_check(check: Check, estimator: Any, context: Context, *, examples: int, derandomize: bool,
               shrink: bool) -> None:
    if not check.draws:
        check.run(estimator, None, context)
        return
    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.generate)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize, phases=phases,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(data=st.data())
    def conforms(data: st.DataObject) -> None:
        check.run(estimator, data, context)

    conforms()


def _label(estimator: Any) -> str:
    """The estimator's name, with the options that differ from its defaults: ``phantom(steps=3)``."""
    if isinstance(estimator, type):
        return _name(estimator)
    default = type(estimator).Config().to_dict()
    changed = {k: v for k, v in estimator.config.to_dict().items() if default.get(k) != v}
    return _name(estimator) + ("(" + ",".join(f"{k}={v}" for k, v in changed.items()) + ")" if changed else "")


def parametrize_with_checks(estimators: Sequence[Any], *, checks: Iterable[str] | None = None,
                            **options: Any) -> Any:
    """A ``pytest.mark.parametrize`` over every (estimator, check) pair, ids like ``"aep-deterministic"``.

    The decorated test receives ``estimator`` and ``check``; ``check(estimator)`` runs that one check with
    ``options`` (those of :func:`check_estimator`: ``models``, ``examples``, ``suite``, ...).
    """
    import functools

    import pytest

    selected = [c for c in CHECKS if checks is None or c.name in set(checks)]
    pairs = [(estimator, functools.partial(check, **options) if options else check)
             for estimator in estimators for check in selected]
    ids = [f"{_label(e)}-{c.name}" for e in estimators for c in selected]
    return pytest.mark.parametrize(("estimator", "check"), pairs, ids=ids)
