"""Seeds. One user seed feeds independent generators, one per purpose, so that changing how the data are drawn
does not change the initial parameters, and an estimator's own randomness is not the initialisation's.
No global RNG is ever touched."""

from __future__ import annotations

import torch

(INIT_STREAM, DATA_STREAM, MASK_STREAM, ESTIMATOR_STREAM, PROBE_STREAM, EVAL_STREAM, EVAL_MASK_STREAM,
 PENALTY_STREAM) = range(8)


def generator(seed: int, stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator for one purpose (``stream``), derived from the user's seed."""
    return torch.Generator(device=device).manual_seed(seed * 7919 + stream)
