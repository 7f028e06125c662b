"""``auto``, registered so that ``epx list datasets`` and ``epx info auto`` show the default data choice.

It is not a dataset: which real datasets it tries depends on the model (``DataSpec.datasets``, in order; e.g.
fashionmnist for cet, shakespeare for lm), so :func:`ep_core.session.load_data`, which has the model's DataSpec,
resolves it and falls back to ``sample`` with one warning. Keeping that in one place
keeps dataset names out of if-chains: a model adds a dataset to ``auto`` by listing it, nothing else changes.
Calling this factory directly is therefore a usage error that says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ep_core.errors import ConfigError

__all__ = ["dataset"]


def dataset(
    *, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
    warn: Callable[[str], Any] | None = None, split: str = "train", kind: str = "images",
    shape: tuple[int, ...] | None = None,
) -> Any:
    raise ConfigError("data", "'auto' is not a dataset but a choice made for a model: "
                              "ep_core.session.load_data(registry, 'auto', spec=Model.data) tries the model's "
                              "DataSpec.datasets in order, then the generated 'sample'; call that, or name a dataset")
