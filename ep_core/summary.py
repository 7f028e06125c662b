"""Summaries of repeated measurements (seeds), without torch: the CLI's tables import this at start-up."""

from __future__ import annotations


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    """(mean, population std) of ``values``; None when there are none or any is missing (a None)."""
    if not values or any(v is None for v in values):
        return None
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
