"""Seeds. One user seed feeds independent generators, one per purpose, so that changing how the data are drawn
does not change the initial parameters, and an estimator's own randomness is not the initialisation's.
No global RNG is ever touched.

A seed is an integer in ``0 … SEED_MAX`` (2³² − 1); every value in that range gives its own generators."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ep_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

(INIT_STREAM, DATA_STREAM, MASK_STREAM, ESTIMATOR_STREAM, PROBE_STREAM, EVAL_STREAM, EVAL_MASK_STREAM,
 PENALTY_STREAM, STATE_STREAM) = range(9)
STREAMS = 9

SEED_MAX = 2**32 - 1
# seed·7919 + stream stays below 2⁴⁶ for every seed in range, far inside the 64 bits manual_seed takes, and two
# (seed, stream) pairs never collide because STREAMS < 7919.
_SPREAD = 7919


def check_seed(seed: int, *, option: str = "seed") -> int:
    """``seed`` if it is an integer in ``0 … SEED_MAX``, else a ConfigError naming ``option``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(option, f"{seed!r} is out of range; valid: an integer from 0 to {SEED_MAX}")
    return seed


def generator(seed: int, stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator for one purpose (``stream``), derived from the user's seed."""
    import torch  # here, not at the top: the command line reads SEED_MAX before torch is needed

    return torch.Generator(device=device).manual_seed(check_seed(seed) * _SPREAD + stream)
