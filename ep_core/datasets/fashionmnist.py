"""Fashion-MNIST (Zalando): 1×28×28 uint8 images of clothing, 10 classes, 60000 for "train" and 10000 for "test".

Where it is looked for
----------------------
The roots of :func:`ep_core.datasets.store.search_path`, then ``/usr/share/datasets/fashion-mnist`` (Debian/
Ubuntu package ``dataset-fashion-mnist``, :data:`SYSTEM_DATA_DIRS`). The first directory that holds *both* files of
the requested split wins. Inside each root three layouts are accepted: the files directly in the root, in
``root/fashion-mnist/``, or in ``root/FashionMNIST/raw/`` (torchvision's layout, so an existing torchvision
download is reused). Each file may be the published gzip'd file (``train-images-idx3-ubyte.gz``) or its
uncompressed form (no ``.gz``).

If no root holds the files and downloading is allowed, the two ``.gz`` files of the split are fetched into
``<user cache>/fashion-mnist/`` from torchvision's mirrors, checked against the published SHA-256 and moved into
place atomically. Every load verifies the files found; IDX is parsed with plain ``struct``/``numpy``.

The dataset's ``normalization`` is the training images' mean and standard deviation in [0, 1] units (0.28604 and
0.35302 over the 60000 images; the usual constants 0.2860, 0.3530), for the models that standardise their inputs
(``DataSpec.normalize``: resmlp); cet reads the pixels in [0, 1].
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ep_core.datasets import store
from ep_core.datasets.images import GZIP_MAGIC, ImageDataset, parse_idx, read_payload
from ep_core.datasets.store import DataNotFound, DownloadError, search_path, user_cache_dir
from ep_core.errors import ChecksumError, FileFormatError

#: Mean and standard deviation of the 60000 training images, in [0, 1] units (one channel).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

__all__ = ["FASHION_MNIST_FILES", "FASHION_MNIST_MEAN", "FASHION_MNIST_RAW_SHA256", "FASHION_MNIST_SHA256",
           "FASHION_MNIST_SIZES", "FASHION_MNIST_STD", "SYSTEM_DATA_DIRS", "dataset", "download_fashion_mnist",
           "fashion_mnist_search_path", "find_fashion_mnist", "load_fashion_mnist"]

#: split -> (images file, labels file), as published (gzip'd names).
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: SHA-256 of the published .gz files (checked against byte-identical copies of Zalando's release).
FASHION_MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

#: SHA-256 of the *decompressed* IDX bytes. Not published: derived from the files above. They let us verify an
#: uncompressed copy, or a .gz that someone recompressed (same content, different gzip bytes).
FASHION_MNIST_RAW_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

#: Byte sizes of the published .gz files; a download that grows past this is cut off early (captive portals,
#: wrong URLs) instead of being read to the end.
FASHION_MNIST_SIZES: dict[str, int] = {
    "train-images-idx3-ubyte.gz": 26_421_880,
    "train-labels-idx1-ubyte.gz": 29_515,
    "t10k-images-idx3-ubyte.gz": 4_422_102,
    "t10k-labels-idx1-ubyte.gz": 5_148,
}

_CLASSES = 10

# torchvision.datasets.FashionMNIST.mirrors as of torchvision 0.29. Plain http is acceptable only because
# every download is checked against the SHA-256 constants above.
_TORCHVISION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

#: System-wide locations, searched last. A module attribute so tests (and packagers) can point it elsewhere.
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

# Sub-directories of a root that may hold the files: ours, and torchvision's FashionMNIST layout.
_LAYOUTS: tuple[tuple[str, ...], ...] = ((), ("fashion-mnist",), ("FashionMNIST", "raw"))


def fashion_mnist_search_path(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Root directories searched for Fashion-MNIST, first match wins (see the module docstring)."""
    return search_path(data_dir, system=SYSTEM_DATA_DIRS)


# ------------------------------------------------------------------------------------------------------------
# Locating
# ------------------------------------------------------------------------------------------------------------


def _split_files(split: str) -> tuple[str, str]:
    try:
        return FASHION_MNIST_FILES[split]
    except KeyError:
        valid = ", ".join(FASHION_MNIST_FILES)
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid: {valid}") from None


def _find_in_dir(d: Path, gz_name: str) -> Path | None:
    # Uncompressed first: it loads without the ~0.2 s of gunzip, and torchvision keeps both side by side.
    for name in (gz_name.removesuffix(".gz"), gz_name):
        p = d / name
        if p.is_file():
            return p
    return None


def find_fashion_mnist(
    split: str = "train", *, data_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, Path] | None:
    """(images path, labels path) from the first directory holding both files of ``split``, or None."""
    img_name, lab_name = _split_files(split)
    for root in fashion_mnist_search_path(data_dir):
        for sub in _LAYOUTS:
            d = root.joinpath(*sub)
            img = _find_in_dir(d, img_name)
            lab = _find_in_dir(d, lab_name) if img is not None else None
            if img is not None and lab is not None:
                return img, lab
    return None


def _not_found(split: str, searched: list[Path], download: str) -> DataNotFound:
    images, labels = _split_files(split)
    return DataNotFound(
        "Fashion-MNIST", searched, download,
        missing=f"no directory holds both {images} and {labels} (or their uncompressed forms), in a root, its "
                "fashion-mnist/ or its FashionMNIST/raw/",
        fixes=(
            "install Debian/Ubuntu's dataset-fashion-mnist (apt install dataset-fashion-mnist), "
            "which provides /usr/share/datasets/fashion-mnist",
            f"go online and allow downloading; files are cached in {user_cache_dir() / 'fashion-mnist'}",
        ),
    )


# ------------------------------------------------------------------------------------------------------------
# Downloading
# ------------------------------------------------------------------------------------------------------------


def _mirrors() -> list[str]:
    """Base URLs to try, in order: torchvision's FashionMNIST.mirrors.

    Our copy of torchvision's list comes first; torchvision's own list is added only when torchvision is
    already imported, because importing it just to read one attribute costs 1-2 s, which an offline run
    would pay on every fallback to the sample set.
    """
    mirrors = list(_TORCHVISION_MIRRORS)
    tv = sys.modules.get("torchvision.datasets")
    for m in getattr(getattr(tv, "FashionMNIST", None), "mirrors", None) or ():
        m = m if m.endswith("/") else m + "/"
        if m not in mirrors:
            mirrors.append(m)
    return mirrors


def download_fashion_mnist(
    split: str = "train", *, root: str | os.PathLike[str] | None = None, timeout: float = 15.0
) -> tuple[Path, Path]:
    """Fetch the two .gz files of ``split`` into ``root`` (default ``<user cache>/fashion-mnist``).

    Files already present there are kept. Mirrors are tried in torchvision's order; ``timeout`` works as in
    :func:`ep_core.datasets.store.download`, per file. Raises DownloadError.
    """
    paths, _ = _download(split, root, timeout)
    return paths


def _download(
    split: str, root: str | os.PathLike[str] | None, timeout: float
) -> tuple[tuple[Path, Path], tuple[str, str]]:
    """Like download_fashion_mnist, also returning where each file came from (URL, or path if kept)."""
    target = Path(root).expanduser() if root is not None else user_cache_dir() / "fashion-mnist"
    paths: list[Path] = []
    sources: list[str] = []
    for name in _split_files(split):
        dest = target / name
        paths.append(dest)
        if dest.is_file():
            sources.append(str(dest))
            continue
        sources.append(store.download([mirror + name for mirror in _mirrors()], dest,
                                      sha256=FASHION_MNIST_SHA256[name], max_bytes=FASHION_MNIST_SIZES[name],
                                      timeout=timeout))
    return (paths[0], paths[1]), (sources[0], sources[1])


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def _load_checked(path: Path, verify: bool) -> np.ndarray:
    if not verify:
        return parse_idx(read_payload(path)[1], path)
    # Measured on the 26 MB train images: SHA-256 of the .gz takes ~0.02 s next to ~0.2 s of gunzip, so every
    # load verifies. That also catches a directory holding MNIST, which uses the same file names. The bytes are
    # checked before they are decompressed, so a truncated download is reported as such, not as bad gzip.
    base = path.name.removesuffix(".gz")
    want_gz, want_raw = FASHION_MNIST_SHA256.get(base + ".gz"), FASHION_MNIST_RAW_SHA256.get(base)
    if want_gz is None or want_raw is None:
        raise ChecksumError(f"{path}: not a Fashion-MNIST file name; cannot verify it")
    raw = path.read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if got in (want_gz, want_raw):
        return parse_idx(read_payload(path)[1] if raw[:2] == GZIP_MAGIC else raw, path)
    try:  # a recompressed .gz: other bytes, same content
        payload = read_payload(path)[1]
        if raw[:2] == GZIP_MAGIC and hashlib.sha256(payload).hexdigest() == want_raw:
            return parse_idx(payload, path)
    except ValueError:
        pass
    published = FASHION_MNIST_SIZES[base + ".gz"]
    size = f"{len(raw)} bytes; the published file has {published}"
    if raw[:2] == GZIP_MAGIC and len(raw) < published:
        size += ": truncated"
    raise ChecksumError(
        f"{path}: SHA-256 {got} ({size}) matches neither the published Fashion-MNIST file (expected {want_gz}) "
        f"nor its uncompressed content ({want_raw}). The file is corrupt, truncated or another dataset (MNIST "
        "uses the same names); delete or replace it, or point EPX_DATA_DIR / --data-dir elsewhere."
    )


def load_fashion_mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    timeout: float = 15.0,
    verify: bool = True,
) -> ImageDataset:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000) as 1×28×28 uint8 images, 10 classes.

    Searches :func:`fashion_mnist_search_path`, then downloads into the user cache if ``download``. Raises
    DataNotFound when neither works, ChecksumError when a found file does not match the published checksum
    (``verify=False`` skips that, e.g. for files you made yourself), FileFormatError when a file is not valid
    IDX.
    """
    _split_files(split)
    found = find_fashion_mnist(split, data_dir=data_dir)
    source: str | None = None
    if found is None:
        searched = fashion_mnist_search_path(data_dir)
        if not download:
            raise _not_found(split, searched, "disabled")
        try:
            found, (source, _) = _download(split, None, timeout)
        except DownloadError as e:
            raise _not_found(split, searched, f"failed: {e}") from e
    img_path, lab_path = found
    images = _load_checked(img_path, verify)
    labels = _load_checked(lab_path, verify)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise FileFormatError(img_path, f"expected images of shape N×28×28, got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise FileFormatError(lab_path, f"expected {images.shape[0]} labels (one per image), "
                         f"got shape {labels.shape}")
    return ImageDataset(
        name="fashionmnist",
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        source=source or str(img_path),
        classes=_CLASSES,
        normalization=(FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    )


def dataset(
    *, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
    warn: Callable[[str], Any] | None = None, split: str = "train", kind: str = "images",
    shape: tuple[int, ...] | None = None,
) -> ImageDataset:
    """The registered factory: Fashion-MNIST's ``split``, whatever ``kind`` and ``shape`` the model asks for
    (the caller reports a mismatch)."""
    return load_fashion_mnist(split, data_dir=data_dir, download=download)
