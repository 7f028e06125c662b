"""ep_core.testing — the conformance kit that every epx estimator, built-in or third-party, is run against.

    from ep_core.testing import check_estimator, parametrize_with_checks

    report = check_estimator(MyRule)               # raises ConformanceError naming the failed checks
    check_model(MyModel(...), batch)               # a model's declared protocols against their definitions

    @parametrize_with_checks([MyRule])
    def test_epx_conformance(estimator, check):    # one pytest test per check
        check(estimator)

The checks (one function each, named in :data:`CHECK_NAMES`) and the contract are documented in
:mod:`ep_core.testing.conformance`, the model checks in :mod:`ep_core.testing.models`; the Hypothesis strategies
they draw from are public in :mod:`ep_core.testing.strategies`. The ``epx`` pytest plugin adds the
``epx_registry`` and ``epx_check`` fixtures, ``--epx-estimators`` and the Hypothesis profiles ``epx-ci`` and
``epx-dev``.
"""

from ep_core.testing.conformance import (
    CHECK_NAMES,
    CHECKS,
    LIMIT_SETTINGS,
    LIMITS,
    MAX_REL_ERROR,
    MIN_COSINE,
    SUITE_VERSION,
    Check,
    CheckResult,
    ConformanceError,
    ConformanceReport,
    at_limit,
    check_cost_scaling,
    check_declarations,
    check_deterministic,
    check_estimator,
    check_exact_limit,
    check_finite_gradients,
    check_gradient_names,
    check_gradient_shapes,
    check_model_untouched,
    check_param_grad_untouched,
    conformance_limit,
    parametrize_with_checks,
    run_estimate,
)
from ep_core.testing.models import MODEL_CHECK_NAMES, check_model
from ep_core.testing.strategies import ToyProblem, batches, configs, make_toy_problem, models, seeds, toy_models

__all__ = [
    "CHECKS", "CHECK_NAMES", "LIMITS", "LIMIT_SETTINGS", "MAX_REL_ERROR", "MIN_COSINE", "MODEL_CHECK_NAMES",
    "SUITE_VERSION", "Check",
    "CheckResult", "ConformanceError", "ConformanceReport", "ToyProblem", "at_limit", "batches", "check_cost_scaling",
    "check_declarations", "check_deterministic", "check_estimator", "check_exact_limit", "check_finite_gradients",
    "check_gradient_names", "check_gradient_shapes", "check_model", "check_model_untouched",
    "check_param_grad_untouched", "conformance_limit", "configs", "make_toy_problem", "models",
    "parametrize_with_checks", "run_estimate", "seeds", "toy_models",
]
