"""Tiny Shakespeare (karpathy/char-rnn's ``input.txt``, the file nanoGPT also uses): 1,115,394 characters, a
65-character vocabulary, split 90/10 into "train" and "val" ("test" means "val").

Where it is looked for
----------------------
The roots of :func:`ep_core.datasets.store.search_path`: the ``data_dir`` argument (the CLI's ``--data-dir``),
``$EPX_DATA_DIR``, then the user cache. No system directory is searched: no distribution packages the file.
Inside each root the first of these wins: ``tinyshakespeare/input.txt`` (ours, and where downloads land),
``shakespeare_char/input.txt`` (nanoGPT's layout), ``shakespeare/input.txt``, ``tinyshakespeare.txt``. A bare
``input.txt`` is not accepted: the name is too generic to mean this text.

The file found is checked against the published SHA-256 on every load (1 MB: about 2 ms). A mismatch raises
:class:`~ep_core.errors.ChecksumError` and never falls back to the sample: the user pointed at this file, so
training on something else would hide the problem. If no root holds the file and downloading is allowed, it is
fetched from :data:`SHAKESPEARE_URLS` into ``<user cache>/tinyshakespeare/input.txt``, verified, and moved into
place atomically; that path is a search location, so the next run finds it there. Tokens are cached as
:mod:`ep_core.datasets.text` describes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ep_core.datasets import store
from ep_core.datasets.store import DataNotFound, DownloadError, search_path, user_cache_dir
from ep_core.datasets.text import TextDataset, cached_tokens, split_dataset, text_split
from ep_core.errors import ChecksumError

__all__ = ["SHAKESPEARE_SHA256", "SHAKESPEARE_SIZE", "SHAKESPEARE_URLS", "dataset", "load_shakespeare"]

#: SHA-256 and byte size of karpathy/char-rnn's data/tinyshakespeare/input.txt (the file nanoGPT also uses).
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_SIZE = 1_115_394

#: Where tiny Shakespeare is downloaded from, tried in order. A module attribute so tests can point it at a
#: file:// URL.
SHAKESPEARE_URLS: tuple[str, ...] = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
)

#: Paths inside a search root that may hold the file, first match wins. The first is where downloads go.
_SHAKESPEARE_LAYOUTS: tuple[str, ...] = (
    "tinyshakespeare/input.txt",
    "shakespeare_char/input.txt",
    "shakespeare/input.txt",
    "tinyshakespeare.txt",
)


def _find_shakespeare(data_dir: str | Path | None) -> Path | None:
    for root in search_path(data_dir):
        for layout in _SHAKESPEARE_LAYOUTS:
            path = root / layout
            if path.is_file():
                return path
    return None


def _download_shakespeare(timeout: float) -> tuple[Path, str]:
    """Fetch the file into the user cache; (path, URL it came from). Raises DownloadError.

    An existing file at the destination is not checked for here: the cache is a search root and
    ``tinyshakespeare/input.txt`` a layout, so a file there would have been found before we got here.
    """
    dest = user_cache_dir() / _SHAKESPEARE_LAYOUTS[0]
    url = store.download(SHAKESPEARE_URLS, dest, sha256=SHAKESPEARE_SHA256, max_bytes=SHAKESPEARE_SIZE,
                         timeout=timeout)
    return dest, url


def _not_found(searched: Sequence[Path], download: str) -> DataNotFound:
    cache = user_cache_dir() / _SHAKESPEARE_LAYOUTS[0]
    accepted = ", ".join(f"<root>/{layout}" for layout in _SHAKESPEARE_LAYOUTS)
    return DataNotFound(
        "tiny Shakespeare", searched, download,
        missing=f"no root holds any of {accepted}",
        fixes=(
            f"copy karpathy/char-rnn's data/tinyshakespeare/input.txt ({SHAKESPEARE_SIZE} bytes) to "
            "<root>/tinyshakespeare/input.txt under one of the roots above",
            f"go online and allow downloading; the file is cached as {cache}",
        ),
    )


def _verify(path: Path, raw: bytes) -> None:
    got = hashlib.sha256(raw).hexdigest()
    if got == SHAKESPEARE_SHA256:
        return
    size = len(raw)
    if size < SHAKESPEARE_SIZE:
        size_note = f"{size} bytes instead of {SHAKESPEARE_SIZE}: truncated"
    elif size > SHAKESPEARE_SIZE:
        size_note = f"{size} bytes instead of {SHAKESPEARE_SIZE}: longer than the published file"
    else:
        size_note = f"{size} bytes as expected, so the content differs"
    raise ChecksumError(
        f"{path}: not tiny Shakespeare: SHA-256 {got}, expected {SHAKESPEARE_SHA256} ({size_note}). Delete or "
        "replace the file (a download puts a verified copy in the user cache), or point EPX_DATA_DIR / "
        "--data-dir elsewhere."
    )


def load_shakespeare(
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
    timeout: float = 15.0,
) -> TextDataset:
    """Tiny Shakespeare's ``split``: "train" (first 90%, 1,003,854 characters) or "val" (the last 111,540);
    "test" means "val". Vocabulary: the 65 characters of the whole text.

    Searches the roots and layouts of the module docstring, then downloads into the user cache if
    ``download``. Raises DataNotFound when neither works, ChecksumError when the file found is not the
    published one.
    """
    split = text_split(split)
    path = _find_shakespeare(data_dir)
    source: str | None = None
    if path is None:
        searched = search_path(data_dir)
        if not download:
            raise _not_found(searched, "disabled")
        try:
            path, source = _download_shakespeare(timeout)
        except DownloadError as e:
            raise _not_found(searched, f"failed: {e}") from e
    raw = path.read_bytes()
    _verify(path, raw)
    chars, tokens = cached_tokens(raw, SHAKESPEARE_SHA256)
    return split_dataset("shakespeare", source or str(path), split, chars, tokens, SHAKESPEARE_SHA256)


def dataset(
    *, data_dir: str | Path | None = None, download: bool = True, warn: Callable[[str], Any] | None = None,
    split: str = "train", kind: str = "text", shape: tuple[int, ...] | None = None,
) -> TextDataset:
    """The registered factory: tiny Shakespeare's ``split``, whatever ``kind`` and ``shape`` the model asks for
    (the caller reports a mismatch)."""
    return load_shakespeare(split, data_dir=data_dir, download=download)
