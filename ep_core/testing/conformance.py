"""The conformance kit: the contract every epx estimator meets, checked on random toy models.

    from ep_core.testing import check_estimator

    def test_my_rule():
        check_estimator(MyRule)            # a class (built from its default config) or an instance

A violation raises ``AssertionError`` naming the estimator, the rule and the parameter; Hypothesis adds the
problem that broke it (``make_toy_problem(...)``, which rebuilds it). The rules (DESIGN.md, "Estimators"):

1. declarations — ``name``, a default-constructible ``Config`` (an :class:`ep_core.config.Config`),
   ``requires``, ``exact_limit``, and an instance attribute ``config``;
2. gradients — a finite gradient for every named parameter, with that parameter's shape, dtype and device;
3. hands off — parameter values, buffers and ``param.grad`` (``None`` stays ``None``) are bit-identical after
   ``estimate``;
4. deterministic — two runs with generators of the same seed give bit-identical gradients;
5. exact where declared — in the limit the estimator declares, its cosine to :class:`ep_core.bptt.BPTT` is at
   least 0.999, with its config moved toward the limit (``beta=1e-3``, ``T2=100`` where those fields exist).

The limit is read from a class attribute ``conformance_limit: ClassVar[str | None]``, one of

- ``"conservative"`` — exact on conservative models (symmetric Jacobian) at a converged stable fixed point;
- ``"any-stable"`` — exact at any converged stable fixed point, conservative or not;
- ``None`` — no exact limit the kit can sample (rule 5 is skipped).

Every estimator declares it (the built-ins do; a class without it is treated as ``None``). Each rule is also a
function (``check_gradients`` ...) that takes any model and batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import torch
from hypothesis import HealthCheck, Phase, given, settings

from ep_core.bptt import BPTT
from ep_core.config import Config
from ep_core.harness import CONVERGED_TOL, gradient_metrics
from ep_core.models.toy import Toy
from ep_core.protocols import Batch, GradientEstimate, parameter_groups
from ep_core.testing.strategies import SEEDS, toy_models

LIMITS = ("conservative", "any-stable")
LIMIT_SETTINGS: dict[str, Any] = {"beta": 1e-3, "T2": 100}
"""Config changes that move an estimator toward its exact limit; only fields the config has are changed.
The kit's toys contract by at most ≈ 0.94 per step, so 100 nudged steps settle to a relative 2e-3 (measured on
the slowest toys: ep and aep reach cosine 1 − 5e-8, far above ``MIN_COSINE``)."""
MIN_COSINE = 0.999


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


def run_estimate(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0) -> GradientEstimate:
    """``estimator.estimate`` with a fresh generator seeded by ``seed`` on the model's device."""
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


def check_gradients(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0,
                    estimate: GradientEstimate | None = None) -> GradientEstimate:
    """Rule 2: a finite gradient for every named parameter, with its shape, dtype and device; no others."""
    estimate = estimate if estimate is not None else run_estimate(estimator, model, batch, seed=seed)
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(estimate.grads)), sorted(set(estimate.grads) - set(params))
    if missing:
        _fail(estimator, f"no gradient for parameters {missing}")
    if extra:
        _fail(estimator, f"gradients for names that are not parameters of the model: {extra}")
    for name, p in params.items():
        g = estimate.grads[name]
        if not isinstance(g, torch.Tensor):
            _fail(estimator, f"the gradient of {name!r} is a {type(g).__name__}, not a tensor")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            _fail(estimator, f"the gradient of {name!r} is {tuple(g.shape)} {g.dtype} on {g.device}; "
                             f"the parameter is {tuple(p.shape)} {p.dtype} on {p.device}")
        bad = int((~torch.isfinite(g)).sum())
        if bad:
            _fail(estimator, f"the gradient of {name!r} has {bad} non-finite entries of {g.numel()}")
    return estimate


def check_leaves_model_untouched(estimator: Any, model: torch.nn.Module, batch: Batch, *,
                                 seed: int = 0) -> GradientEstimate:
    """Rule 3: parameters, buffers, train/eval mode and ``param.grad`` are the same after ``estimate``.

    Every other parameter gets a sentinel ``.grad`` for the run (the rest ``None``), so that writing a fresh
    gradient and changing an existing one are both caught; the original ``.grad`` values are put back after.
    """
    params = list(model.named_parameters())
    original_grads = [p.grad for _, p in params]
    try:
        for i, (_, p) in enumerate(params):
            p.grad = torch.full_like(p, 0.125) if i % 2 == 0 else None
        sentinels = {name: None if p.grad is None else p.grad.clone() for name, p in params}
        before = {key: value.detach().clone() for key, value in model.state_dict().items()}
        training = model.training
        estimate = run_estimate(estimator, model, batch, seed=seed)
        for name, p in params:
            if sentinels[name] is None and p.grad is not None:
                _fail(estimator, f"set {name}.grad, which was None; estimators return gradients in "
                                 f"GradientEstimate.grads and never write param.grad")
            if sentinels[name] is not None and (p.grad is None or not torch.equal(p.grad, sentinels[name])):
                _fail(estimator, f"changed {name}.grad; estimators never touch param.grad")
        after = model.state_dict()
        if set(after) != set(before):
            _fail(estimator, f"changed the model's parameters/buffers: {sorted(set(after) ^ set(before))}")
        changed = [key for key, value in before.items() if not torch.equal(after[key], value)]
        if changed:
            _fail(estimator, f"changed the model: {changed} differ after estimate()")
        if model.training != training:
            _fail(estimator, "switched the model between train and eval mode")
        return estimate
    finally:
        for (_, p), grad in zip(params, original_grads):
            p.grad = grad


def check_deterministic(estimator: Any, model: torch.nn.Module, batch: Batch, *, seed: int = 0,
                        first: GradientEstimate | None = None) -> None:
    """Rule 4: two runs with generators seeded by ``seed`` give bit-identical gradients."""
    first = first if first is not None else run_estimate(estimator, model, batch, seed=seed)
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
                      settings: Mapping[str, Any] = LIMIT_SETTINGS, seed: int = 0,
                      reference: GradientEstimate | None = None) -> dict[str, Any]:
    """Rule 5 on one problem: cosine to bptt ≥ ``min_cosine`` with the config moved toward its limit.

    The caller picks a problem inside the estimator's limit (see :func:`conformance_limit`); its free phase
    must have converged. Returns :func:`ep_core.harness.gradient_metrics` of the estimate against bptt.
    """
    if reference is None:
        reference = run_estimate(BPTT(), model, batch, seed=seed)
    residual = reference.stats.get("residual")
    if residual is None or not residual <= CONVERGED_TOL:
        raise ValueError(f"the free phase of this problem has not converged (residual {residual} > "
                         f"{CONVERGED_TOL:g}); an exact limit holds only at a fixed point: raise T1")
    limited = at_limit(estimator, settings)
    metrics = gradient_metrics(run_estimate(limited, model, batch, seed=seed).grads, reference.grads,
                               parameter_groups(model))
    cosine = metrics["cosine"]
    if cosine is None:
        raise ValueError("the bptt gradient of this problem is zero, so no cosine is defined")
    if not cosine >= min_cosine:
        per_parameter = ", ".join(f"{n} {c:.4f}" if c is not None else f"{n} n/a"
                                  for n, c in metrics["parameters"].items())
        _fail(estimator, f"declares itself exact in the limit {conformance_limit(estimator)!r}, but its "
                         f"cosine to bptt is {cosine:.6f} < {min_cosine} with config "
                         f"{limited.config.to_dict()} (per parameter: {per_parameter})")
    return metrics


# --- everything at once -------------------------------------------------------------------------------------

def check_estimator(estimator: Any, *, examples: int = 25, exact: bool = True, min_cosine: float = MIN_COSINE,
                    limit_settings: Mapping[str, Any] = LIMIT_SETTINGS, derandomize: bool = True,
                    shrink: bool = False) -> None:
    """Check rules 1–5 on ``examples`` random toy models (conservative and not, float64, 1–4 samples).

    ``estimator`` is a class (built from its default config) or an instance (checked with its config).
    ``exact=False`` skips rule 5. ``derandomize`` (the default) draws the same problems on every run, as a CI
    check should; ``shrink=True`` lets Hypothesis look for a smaller failing problem (slow: estimators are).
    Raises AssertionError at the first violation.
    """
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    check_declarations(estimator)
    estimator = as_estimator(estimator)
    if not isinstance(Toy(generator=torch.Generator().manual_seed(0)), estimator.requires):
        raise TypeError(f"{_name(estimator)} needs a {estimator.requires.__name__}; the conformance kit "
                        f"samples toy equilibrium models only")
    limit = conformance_limit(estimator) if exact else None
    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.generate)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize, phases=phases,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.nested_given])
    @given(problem=toy_models(), seed=SEEDS)
    def conforms(problem, seed):
        model, batch = problem
        first = check_leaves_model_untouched(estimator, model, batch, seed=seed)
        check_gradients(estimator, model, batch, estimate=first)
        check_deterministic(estimator, model, batch, seed=seed, first=first)
        if limit == "any-stable" or (limit == "conservative" and problem.config.conservative):
            check_exact_limit(estimator, model, batch, min_cosine=min_cosine, settings=limit_settings,
                              seed=seed)

    conforms()
