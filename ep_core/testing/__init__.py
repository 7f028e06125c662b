"""ep_core.testing — the conformance kit that every epx estimator, built-in or third-party, is run against.

    from ep_core.testing import check_estimator
    check_estimator(MyRule)                         # raises AssertionError naming the violated rule

or, with pytest (the ``epx`` pytest plugin is installed with epx), the fixture ``epx_check``::

    def test_my_rule(epx_check):
        epx_check(MyRule)

The rules, one function each, and the Hypothesis strategies they draw problems from, are exported below;
:mod:`ep_core.testing.conformance` documents the contract.
"""

from ep_core.testing.conformance import (
    LIMIT_SETTINGS,
    LIMITS,
    MIN_COSINE,
    at_limit,
    check_declarations,
    check_deterministic,
    check_estimator,
    check_exact_limit,
    check_gradients,
    check_leaves_model_untouched,
    conformance_limit,
    run_estimate,
)
from ep_core.testing.strategies import ToyProblem, make_toy_problem, toy_configs, toy_models

__all__ = [
    "LIMITS", "LIMIT_SETTINGS", "MIN_COSINE", "ToyProblem", "at_limit",
    "check_declarations", "check_deterministic", "check_estimator", "check_exact_limit", "check_gradients",
    "check_leaves_model_untouched", "conformance_limit", "make_toy_problem", "run_estimate", "toy_configs",
    "toy_models",
]
