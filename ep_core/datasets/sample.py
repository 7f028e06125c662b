"""The registered ``sample``: generated data in the kind and shape the model asks for, deterministic and offline.

Images (:func:`ep_core.datasets.images.sample_images`) are drawn in the requested C×H×W, 1×28×28 when none is
given; text is the generated play (:func:`ep_core.datasets.text.make_text_sample`), which serves any context
window, so the shape is not needed for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ep_core.datasets.images import sample_images
from ep_core.datasets.text import make_text_sample
from ep_core.errors import ConfigError

__all__ = ["dataset"]

_MAKERS: dict[str, Callable[[str, tuple[int, ...] | None], Any]] = {
    "images": sample_images,
    "text": lambda split, shape: make_text_sample(split),
}


def dataset(
    *, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
    warn: Callable[[str], Any] | None = None, split: str = "train", kind: str = "images",
    shape: tuple[int, ...] | None = None,
) -> Any:
    """The generated ``split`` of ``kind`` ("images" or "text") in ``shape``; no file is read and nothing is
    downloaded, so ``data_dir``, ``download`` and ``warn`` do not apply."""
    if kind not in _MAKERS:
        raise ConfigError("data", f"unknown data kind {kind!r}; valid kinds: {', '.join(_MAKERS)}")
    return _MAKERS[kind](split, shape)
