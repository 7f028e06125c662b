"""The epx pytest plugin (entry point ``pytest11: epx``), kept small and lazy: nothing of epx is imported until a
fixture is used.

- ``epx_check``: :func:`ep_core.testing.check_estimator`; ``epx_check(MyRule)`` or with options.
- ``epx_registry``: the registry of installed estimators, models and datasets, as ``epx`` itself loads it.
- ``epx_estimators``: the names given with ``--epx-estimators a,b`` (all registered estimators if absent), for
  tests that check whatever the user selects.
- Hypothesis profiles ``epx-ci`` (derandomized, 25 examples, no deadline) and ``epx-dev`` (random, 10
  examples, no deadline); pick one with ``--epx-profile`` or Hypothesis's own ``--hypothesis-profile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

PROFILES = {"epx-ci": {"max_examples": 25, "derandomize": True, "deadline": None, "database": None},
            "epx-dev": {"max_examples": 10, "deadline": None}}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("epx")
    group.addoption("--epx-estimators", default=None, metavar="NAMES",
                    help="comma-separated estimator names for the epx_estimators fixture (default: all registered)")
    group.addoption("--epx-profile", default=None, choices=sorted(PROFILES),
                    help="load this Hypothesis settings profile")


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's own plugin reads --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    from hypothesis import settings

    for name, values in PROFILES.items():
        settings.register_profile(name, **values)
    profile = config.getoption("--epx-profile", default=None)
    if profile:
        settings.load_profile(profile)


@pytest.fixture
def epx_check() -> Callable[..., Any]:
    """:func:`ep_core.testing.check_estimator`: the epx conformance suite for an estimator."""
    from ep_core.testing import check_estimator

    return check_estimator


@pytest.fixture(scope="session")
def epx_registry() -> Any:
    """The registry ``epx`` uses: ep_core's entries and every installed plugin's."""
    from ep_core.plugins import load

    return load()


@pytest.fixture(scope="session")
def epx_estimators(request: pytest.FixtureRequest, epx_registry: Any) -> list[str]:
    """The estimators selected with ``--epx-estimators`` (validated), or every registered one."""
    chosen = request.config.getoption("--epx-estimators")
    if chosen is None:
        return epx_registry.names("estimator")
    names = [name.strip() for name in chosen.split(",") if name.strip()]
    for name in names:
        epx_registry.get("estimator", name)  # an unknown name fails with a did-you-mean
    return names
