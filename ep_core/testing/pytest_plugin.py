"""The epx pytest plugin (entry point ``pytest11: epx``): one fixture, ``epx_check``.

    def test_my_rule(epx_check):
        epx_check(MyRule)                # = ep_core.testing.check_estimator(MyRule)
        epx_check(MyRule(MyRule.Config(beta=0.01)), examples=50)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ep_core.testing.conformance import check_estimator


@pytest.fixture
def epx_check() -> Callable[..., None]:
    """:func:`ep_core.testing.check_estimator`: the epx conformance suite for an estimator."""
    return check_estimator
