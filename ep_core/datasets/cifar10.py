"""CIFAR-10, the official *binary* version: 3×32×32 uint8 colour images, 10 classes, 50000 for "train" (the five
``data_batch_N.bin``) and 10000 for "test" (``test_batch.bin``). The pickled "python version" is never read.

Where it is looked for
----------------------
The roots of :func:`ep_core.datasets.store.search_path` (``--data-dir``, ``$EPX_DATA_DIR``, the user cache; no
system package provides it). In each root, and then in ``root/cifar-10/``, the first of these wins: the extracted
``cifar-10-batches-bin/`` holding every file of the split (it loads without gunzip), or the tarball
``cifar-10-binary.tar.gz`` as published. If none is found and downloading is allowed, the tarball is fetched from
:data:`CIFAR10_URLS` into ``<user cache>/cifar-10/``, checked against its SHA-256 and moved into place
atomically; the next run finds it there.

Checks
------
Every load verifies what it reads: the tarball against :data:`CIFAR10_SHA256` (published by TensorFlow Datasets,
``url_checksums/cifar10.txt``, with its size), or each extracted file against :data:`CIFAR10_FILE_SHA256`. The
records are then read with ``tarfile`` and ``numpy``: 3073 bytes each, a label byte (0..9) and 3×32×32 pixels,
channel-major (the red plane, then green, then blue, each row by row). A file that does not check out is a
ChecksumError or FileFormatError naming it, never a reason to fall back to the sample.

Seed 004's preprocessing comes with the data: the dataset's ``normalization`` (per-channel mean and std of the
training images) standardises the batches of a model that asks for it (``DataSpec.normalize``: resmlp), and
``batch(..., augment=True)`` adds the training augmentation (random crop with 4-pixel zero padding, random
horizontal flip).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ep_core.datasets import store
from ep_core.datasets.images import ImageDataset
from ep_core.datasets.store import DataNotFound, DownloadError, search_path, user_cache_dir
from ep_core.errors import ChecksumError, FileFormatError

__all__ = ["CIFAR10_FILES", "CIFAR10_FILE_SHA256", "CIFAR10_MEAN", "CIFAR10_SHA256", "CIFAR10_SIZE", "CIFAR10_STD",
           "CIFAR10_URLS", "dataset", "find_cifar10", "load_cifar10"]

ARCHIVE = "cifar-10-binary.tar.gz"
BATCHES = "cifar-10-batches-bin"

#: The published tarball: SHA-256 and size from tensorflow/datasets, tensorflow_datasets/url_checksums/cifar10.txt
#: (the same SHA-256 is in ankane/torchvision-ruby and gomlx; the size is what TensorFlow's tutorial reports).
CIFAR10_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
CIFAR10_SIZE = 170_052_171

#: Where the tarball is downloaded from, tried in order (a module attribute so tests can use file:// URLs).
CIFAR10_URLS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",)

#: split -> the files of ``cifar-10-batches-bin/`` that hold it, in order.
CIFAR10_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}

#: SHA-256 of the extracted files (from ankane/torchvision-ruby's CIFAR10; test_batch.bin's also matches an
#: independent record of the file), for a directory someone extracted.
CIFAR10_FILE_SHA256: dict[str, str] = {
    "data_batch_1.bin": "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
    "data_batch_2.bin": "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
    "data_batch_3.bin": "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
    "data_batch_4.bin": "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
    "data_batch_5.bin": "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
    "test_batch.bin": "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
}

_CHANNELS, _SIDE, _CLASSES = 3, 32, 10
RECORD_BYTES = 1 + _CHANNELS * _SIDE * _SIDE
#: Every published batch file holds 10000 records.
FILE_SIZE = 10_000 * RECORD_BYTES

#: Seed 004's normalisation (torchvision's usual CIFAR-10 constants), per channel, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Sub-directories of a root that may hold the tarball or the extracted directory.
_LAYOUTS: tuple[tuple[str, ...], ...] = ((), ("cifar-10",))

_REMEDY = "delete or replace it, or point EPX_DATA_DIR / --data-dir elsewhere"


def _split_files(split: str) -> tuple[str, ...]:
    try:
        return CIFAR10_FILES[split]
    except KeyError:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; valid: {', '.join(CIFAR10_FILES)}") from None


def find_cifar10(split: str = "train", *, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The first extracted ``cifar-10-batches-bin/`` holding every file of ``split``, or tarball, or None."""
    names = _split_files(split)
    for root in search_path(data_dir):
        for sub in _LAYOUTS:
            d = root.joinpath(*sub)
            if all((d / BATCHES / name).is_file() for name in names):
                return d / BATCHES
            if (d / ARCHIVE).is_file():
                return d / ARCHIVE
    return None


def _not_found(split: str, searched: list[Path], download: str) -> DataNotFound:
    files = ", ".join(_split_files(split))
    return DataNotFound(
        "CIFAR-10", searched, download,
        missing=f"no root holds {ARCHIVE} or {BATCHES}/ with {files}, directly or in its cifar-10/",
        fixes=(
            f"download the binary version, {CIFAR10_URLS[0]} ({CIFAR10_SIZE} bytes, SHA-256 {CIFAR10_SHA256}), "
            f"and put it (as it is, or extracted) in <root>/cifar-10/ under one of the roots above; the python "
            "version (cifar-10-python.tar.gz) is not read",
            f"go online and allow downloading; the file is cached as {user_cache_dir() / 'cifar-10' / ARCHIVE}",
        ),
    )


# ------------------------------------------------------------------------------------------------------------
# Verifying and reading
# ------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> tuple[str, int]:
    """(SHA-256, size) of a file, read in chunks: the tarball need not sit in memory twice."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _verify(path: Path, want: str, published: int, what: str) -> None:
    got, size = _sha256(path)
    if got == want:
        return
    note = f"{size} bytes; the published file has {published}"
    if size < published:
        note += ": truncated"
    raise ChecksumError(f"{path}: SHA-256 {got} ({note}) does not match the published {what} (expected {want}). "
                        f"The file is corrupt, truncated or another file; {_REMEDY}.")


def _records(raw: bytes, where: str) -> np.ndarray:
    """The N×3073 uint8 records of one batch file, checked for whole records and labels 0..9."""
    if not raw or len(raw) % RECORD_BYTES:
        raise FileFormatError(where, f"{len(raw)} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 "
                                     "records (a label byte and 3×32×32 pixels)", _REMEDY)
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    bad = np.flatnonzero(records[:, 0] >= _CLASSES)
    if bad.size:
        raise FileFormatError(where, f"record {int(bad[0])} has label {int(records[bad[0], 0])}, outside "
                                     f"0..{_CLASSES - 1}: not a CIFAR-10 batch file", _REMEDY)
    return records


def _read_directory(directory: Path, names: tuple[str, ...], verify: bool) -> list[np.ndarray]:
    out = []
    for name in names:
        path = directory / name
        if verify:
            _verify(path, CIFAR10_FILE_SHA256[name], FILE_SIZE, f"CIFAR-10 binary file {name}")
        out.append(_records(path.read_bytes(), str(path)))
    return out


def _read_archive(path: Path, names: tuple[str, ...], verify: bool) -> list[np.ndarray]:
    if verify:
        _verify(path, CIFAR10_SHA256, CIFAR10_SIZE, f"CIFAR-10 binary archive {ARCHIVE}")
    wanted = {f"{BATCHES}/{name}": name for name in names}
    found: dict[str, bytes] = {}
    try:
        # Stream mode: one pass through the gzip stream, stopping once the split's members have been read.
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    handle = tar.extractfile(member)
                    if handle is None:
                        raise tarfile.ReadError(f"cannot read member {member.name}")
                    found[wanted[member.name]] = handle.read()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise FileFormatError(path, f"not a readable gzip'd tar archive ({e})", _REMEDY) from None
    missing = [member for member, name in wanted.items() if name not in found]
    if missing:
        raise FileFormatError(path, f"has no member {', '.join(missing)}: not the CIFAR-10 binary archive", _REMEDY)
    return [_records(found[name], f"{path}:{BATCHES}/{name}") for name in names]


def load_cifar10(
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    timeout: float = 15.0,
    verify: bool = True,
) -> ImageDataset:
    """CIFAR-10 ``split`` ("train": 50000, "test": 10000) as 3×32×32 uint8 images, 10 classes, with seed 004's
    normalisation attached.

    Searches as the module docstring says, then downloads the tarball into the user cache if ``download``.
    Raises DataNotFound when neither works, ChecksumError when a file found is not the published one
    (``verify=False`` skips the checksums, e.g. for files you made yourself in the same format), FileFormatError
    when a file is not a readable archive or not whole records.
    """
    names = _split_files(split)
    found = find_cifar10(split, data_dir=data_dir)
    source: str | None = None
    if found is None:
        searched = search_path(data_dir)
        if not download:
            raise _not_found(split, searched, "disabled")
        found = user_cache_dir() / "cifar-10" / ARCHIVE
        try:
            source = store.download(CIFAR10_URLS, found, sha256=CIFAR10_SHA256, max_bytes=CIFAR10_SIZE,
                                    timeout=timeout)
        except DownloadError as e:
            raise _not_found(split, searched, f"failed: {e}") from e
    parts = _read_directory(found, names, verify) if found.is_dir() else _read_archive(found, names, verify)
    records = np.concatenate(parts)
    # The pixel columns of a record are C×H×W already (channel-major, rows in order): a reshape, no transpose.
    images = records[:, 1:].reshape(-1, _CHANNELS, _SIDE, _SIDE)
    return ImageDataset(
        name="cifar10",
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(records[:, 0].astype(np.int64)),
        source=source or str(found),
        classes=_CLASSES,
        normalization=(CIFAR10_MEAN, CIFAR10_STD),
    )


def dataset(
    *, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
    warn: Callable[[str], Any] | None = None, split: str = "train", kind: str = "images",
    shape: tuple[int, ...] | None = None,
) -> ImageDataset:
    """The registered factory: CIFAR-10's ``split``, whatever ``kind`` and ``shape`` the model asks for (the
    caller reports a mismatch)."""
    return load_cifar10(split, data_dir=data_dir, download=download)
