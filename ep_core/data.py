"""Image datasets for epx: Fashion-MNIST from local files or the network, and a generated ``sample`` set.

Where Fashion-MNIST is looked for
---------------------------------
The first directory that holds *both* files of the requested split wins. Roots are tried in this order:

1. the ``data_dir`` argument (the CLI's ``--data-dir``);
2. ``$EPX_DATA_DIR``;
3. the user cache, ``$XDG_CACHE_HOME/epx`` or ``~/.cache/epx`` (downloads land in ``<cache>/fashion-mnist/``);
4. ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``).

Inside each root three layouts are accepted: the files directly in the root, in ``root/fashion-mnist/``, or
in ``root/FashionMNIST/raw/`` (torchvision's layout, so an existing torchvision download is reused). Each file
may be the published gzip'd file (``train-images-idx3-ubyte.gz``) or its uncompressed form (no ``.gz``).

If no root holds the files and downloading is allowed, the two ``.gz`` files of the split are fetched into the
user cache from torchvision's mirrors, checked against the published SHA-256 and moved into place atomically.
Nothing here ever unpickles anything: IDX is parsed by :func:`read_idx` with plain ``struct``/``numpy``.

The ``auto`` choice tries all of the above and, when Fashion-MNIST is unreachable, warns once and falls back
to :func:`make_sample`, a small deterministic dataset of synthetic shapes. Every :class:`ImageDataset` carries
its ``name`` and ``source`` so results can record the data actually used (:meth:`ImageDataset.describe`).

Character-level text (tiny Shakespeare and a generated play) lives in :mod:`ep_core.text`, which shares the
search roots (:func:`search_path`), the download machinery and the errors defined here. The registered dataset
factories take a ``kind`` argument, "images" or "text", so ``sample`` and ``auto`` can serve either kind of
model; ``fashionmnist`` and ``shakespeare`` always return their own kind and leave the mismatch to the caller.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import operator
import os
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ep_core.errors import ChecksumError, DataError, FileFormatError

__all__ = [
    "DATASET_NAMES",
    "DATA_KINDS",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_RAW_SHA256",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_SIZES",
    "SYSTEM_DATA_DIRS",
    "ChecksumError",
    "DataNotFound",
    "DownloadError",
    "ImageDataset",
    "download_fashion_mnist",
    "fashion_mnist_search_path",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "make_sample",
    "read_idx",
    "real_or_sample",
    "auto_dataset",
    "fashionmnist_dataset",
    "sample_dataset",
    "shakespeare_dataset",
    "resolve_images",
    "search_path",
    "user_cache_dir",
]

# ------------------------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------------------------

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

_FASHION_MNIST_CLASSES = 10

# torchvision.datasets.FashionMNIST.mirrors as of torchvision 0.29. Plain http is acceptable only because
# every download is checked against the SHA-256 constants above.
_TORCHVISION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

#: System-wide locations, searched last. A module attribute so tests (and packagers) can point it elsewhere.
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

# Sub-directories of a root that may hold the files: ours, and torchvision's FashionMNIST layout.
_LAYOUTS: tuple[tuple[str, ...], ...] = ((), ("fashion-mnist",), ("FashionMNIST", "raw"))

#: Every registered dataset name, of either kind.
DATASET_NAMES: tuple[str, ...] = ("auto", "fashionmnist", "sample", "shakespeare")
_IMAGE_NAMES: tuple[str, ...] = ("auto", "fashionmnist", "sample")

#: What a model can learn from, as passed to the dataset factories' ``kind``.
DATA_KINDS: tuple[str, ...] = ("images", "text")

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UINT8 = 0x08
_USER_AGENT = "epx (+https://github.com/zalandoresearch/fashion-mnist)"


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class DataNotFound(DataError):
    """A real dataset could not be found locally nor downloaded.

    ``searched`` lists the root directories tried, ``download`` says what happened to the download. By default
    the message describes Fashion-MNIST (both ``files`` in a root, its ``fashion-mnist/`` or its
    ``FashionMNIST/raw/``); another dataset passes ``layouts``, the root-relative paths it accepts, and
    ``fixes``, its own remedies listed after the common ones (EPX_DATA_DIR, --data-dir).
    """

    def __init__(
        self,
        dataset: str,
        files: Sequence[str],
        searched: Sequence[Path],
        download: str,
        *,
        layouts: Sequence[str] | None = None,
        fixes: Sequence[str] | None = None,
    ) -> None:
        self.dataset = dataset
        self.files = tuple(files)
        self.searched = tuple(searched)
        self.download = _one_line(download)
        self.layouts = tuple(layouts) if layouts is not None else None
        if self.layouts is None:
            lines = [f"{dataset} not found: no directory holds both {' and '.join(self.files)} (or their "
                     "uncompressed forms). Searched, in order (each root also as <root>/fashion-mnist/ and "
                     "<root>/FashionMNIST/raw/):"]
        else:
            accepted = ", ".join(f"<root>/{layout}" for layout in self.layouts)
            lines = [f"{dataset} not found: no root holds any of {accepted}. Searched, in order:"]
        for root in self.searched:
            note = "" if root.is_dir() else "  (does not exist)"
            lines.append(f"  - {root}{note}")
        lines.append(f"Download: {self.download}")
        lines.append("To fix, do one of:")
        lines.append("  - set EPX_DATA_DIR to a directory holding the files (e.g. ../shared/data)")
        lines.append("  - pass --data-dir DIR (or data_dir=DIR)")
        if fixes is None:
            fixes = (
                "install Debian/Ubuntu's dataset-fashion-mnist (apt install dataset-fashion-mnist), "
                "which provides /usr/share/datasets/fashion-mnist",
                f"go online and allow downloading; files are cached in {user_cache_dir() / 'fashion-mnist'}",
            )
        lines.extend(f"  - {fix}" for fix in fixes)
        super().__init__("\n".join(lines))

    @property
    def summary(self) -> str:
        """One line: what was missing, where we looked, and what the download did."""
        where = ", ".join(str(p) for p in self.searched)
        return f"{self.dataset} not found (searched: {where}; download: {self.download})"


class DownloadError(OSError):
    """Every mirror failed for some file; ``attempts`` holds one line per (url, error)."""

    def __init__(self, attempts: Sequence[str]) -> None:
        self.attempts = tuple(attempts)
        super().__init__("; ".join(self.attempts) if self.attempts else "no download attempted")


# ------------------------------------------------------------------------------------------------------------
# The dataset object
# ------------------------------------------------------------------------------------------------------------


def _kind(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} with shape {tuple(t.shape)}"
    return type(t).__name__


# eq=False: dataclass equality would compare tensors element-wise and raise; identity is what callers want.
@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An in-memory image classification dataset.

    ``images`` is uint8 N×C×H×W (0..255), ``labels`` is int64 N in ``[0, classes)``. ``source`` is the file
    the images were read from, the URL they were downloaded from, or ``"generated"``.
    """

    kind: ClassVar[str] = "images"

    name: str
    images: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    source: str
    classes: int

    def __post_init__(self) -> None:
        img, lab = self.images, self.labels
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 4:
            raise ValueError(f"{self.name}: images must be a uint8 tensor N×C×H×W, got {_kind(img)}")
        if not isinstance(lab, torch.Tensor) or lab.dtype != torch.int64 or lab.dim() != 1:
            raise ValueError(f"{self.name}: labels must be an int64 tensor of shape (N,), got {_kind(lab)}")
        if lab.shape[0] != img.shape[0]:
            raise ValueError(f"{self.name}: {img.shape[0]} images but {lab.shape[0]} labels")
        if img.shape[0] < 1:
            raise ValueError(f"{self.name}: dataset is empty")
        if self.classes < 1:
            raise ValueError(f"{self.name}: classes must be >= 1, got {self.classes}")
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi >= self.classes:
            raise ValueError(f"{self.name}: labels span {lo}..{hi}, outside 0..{self.classes - 1}")

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    def __len__(self) -> int:
        return self.n

    def batch(
        self,
        size: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random subset without replacement: images scaled to [0, 1] in ``dtype``, int64 labels.

        The subset depends only on ``generator``'s state, so a fixed seed gives the same batch.
        """
        n = self.n
        if isinstance(size, bool):
            raise TypeError(f"batch size must be an integer, got {size!r}")
        try:
            size = operator.index(size)
        except TypeError:
            raise TypeError(f"batch size must be an integer, got {size!r}") from None
        if not 1 <= size <= n:
            raise ValueError(f"batch size {size} is out of range for dataset {self.name!r} with N={n} "
                             f"samples (need 1 <= size <= {n})")
        if not dtype.is_floating_point:
            raise ValueError(f"batch dtype must be floating point, got {dtype}")
        # randperm must run where the generator lives; the index itself is used on the CPU copy.
        idx = torch.randperm(n, generator=generator, device=generator.device)[:size].cpu()
        # Move uint8 before converting: a quarter of the bytes of a float32 copy cross the bus.
        x = self.images[idx].to(device=device).to(dtype).div_(255)
        y = self.labels[idx].to(device=device)
        return x, y

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the data actually used, for results."""
        return {
            "name": self.name,
            "source": self.source,
            "n": self.n,
            "shape": [int(s) for s in self.images.shape[1:]],
            "classes": int(self.classes),
        }


# ------------------------------------------------------------------------------------------------------------
# IDX parsing
# ------------------------------------------------------------------------------------------------------------


def _read_file(path: Path) -> tuple[bytes, bytes]:
    """(bytes on disk, IDX payload). Compression is decided by the gzip magic, so names cannot lie."""
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw, raw
    try:
        return raw, gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise FileFormatError(path, f"corrupt gzip data ({e})") from None


def _parse_idx(payload: bytes, path: Path) -> np.ndarray:
    if len(payload) < 4:
        raise FileFormatError(path, f"not an IDX file: {len(payload)} bytes, shorter than the 4-byte magic")
    zero, dtype_code, ndim = struct.unpack(">HBB", payload[:4])
    if zero != 0 or ndim == 0:
        raise FileFormatError(path, f"not an IDX file: bad magic 0x{payload[:4].hex()} "
                         "(expected 0x000008NN with NN = number of dimensions, e.g. 0x00000803)")
    if dtype_code != _IDX_UINT8:
        raise FileFormatError(path, f"unsupported IDX element type 0x{dtype_code:02x}; "
                         "only 0x08 (uint8) is supported")
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise FileFormatError(path, f"truncated IDX header: {ndim} dimensions need {header} bytes, "
                         f"file has {len(payload)}")
    dims = struct.unpack(f">{ndim}I", payload[4:header])
    expected = header + math.prod(dims)
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "has trailing bytes"
        raise FileFormatError(path, f"IDX data {what}: shape {dims} needs {expected} bytes, "
                         f"file has {len(payload)}")
    # copy(): frombuffer views immutable bytes; callers (and torch.from_numpy) want an owned, writable array.
    return np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (gzip'd or raw, told apart by the gzip magic) into a uint8 array of its shape.

    Raises ``ValueError`` naming the file on a bad magic, an element type other than uint8, a corrupt gzip
    stream, or a byte count that does not match the declared shape.
    """
    path = Path(path)
    _, payload = _read_file(path)
    return _parse_idx(payload, path)


# ------------------------------------------------------------------------------------------------------------
# Where datasets are looked for
# ------------------------------------------------------------------------------------------------------------


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/epx``, or ``~/.cache/epx`` when XDG_CACHE_HOME is unset or empty."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "epx"


def search_path(
    data_dir: str | os.PathLike[str] | None = None, *, system: Sequence[Path] = ()
) -> list[Path]:
    """Root directories to search for a dataset, first match wins: ``data_dir``, ``$EPX_DATA_DIR``, the user
    cache, then the dataset's ``system`` locations. Empty values are skipped, repeated directories kept once."""
    roots: list[Path] = []
    # Absolute: the paths end up in results (the data's source), which must mean the same from any directory.
    if data_dir is not None and str(data_dir) != "":
        roots.append(Path(os.path.abspath(Path(data_dir).expanduser())))
    env = os.environ.get("EPX_DATA_DIR")
    if env:
        roots.append(Path(os.path.abspath(Path(env).expanduser())))
    roots.append(user_cache_dir())
    roots.extend(system)
    unique: list[Path] = []
    for r in roots:
        if r not in unique:
            unique.append(r)
    return unique


def fashion_mnist_search_path(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Root directories searched for Fashion-MNIST, first match wins (see the module docstring)."""
    return search_path(data_dir, system=SYSTEM_DATA_DIRS)


# ------------------------------------------------------------------------------------------------------------
# Locating Fashion-MNIST
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


def _resolve_host(url: str, timeout: float) -> None:
    """Fail within ``timeout`` if the host name cannot be resolved.

    urlopen's timeout covers sockets but not getaddrinfo, and a machine with an unreachable DNS server can
    block there for tens of seconds. Through a proxy the proxy resolves names, so we skip the check.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in urllib.request.getproxies() or not parts.hostname:
        return
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            result.append(e)

    # daemon: a resolver stuck past our deadline must not keep the interpreter from exiting.
    t = threading.Thread(target=target, name="epx-resolve", daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise TimeoutError(f"resolving {parts.hostname} took longer than {timeout:.1f} s")
    if result[0] is not None:
        raise OSError(f"cannot resolve {parts.hostname}: {result[0]}")


def _fetch(url: str, dest: Path, *, sha256: str, max_bytes: int, timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically, verifying SHA-256; on any failure nothing is left behind.

    Raises OSError (network, too large) or ChecksumError.
    """
    _resolve_host(url, timeout)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as dest so os.replace is a rename on one file system, never a copy.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        total = 0
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(request, timeout=timeout) as resp:
            while chunk := resp.read(1 << 16):
                total += len(chunk)
                if total > max_bytes:
                    raise OSError(f"{url}: response exceeds the expected {max_bytes} bytes; "
                                  "not the dataset file")
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        got = digest.hexdigest()
        if got != sha256:
            raise ChecksumError(f"{url}: SHA-256 mismatch: got {got}, expected {sha256} ({total} bytes); "
                                "the download was discarded")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download_fashion_mnist(
    split: str = "train", *, root: str | os.PathLike[str] | None = None, timeout: float = 15.0
) -> tuple[Path, Path]:
    """Fetch the two .gz files of ``split`` into ``root`` (default ``<user cache>/fashion-mnist``).

    Files already present there are kept. Mirrors are tried in torchvision's order. ``timeout`` bounds each
    socket operation and also the time spent on failing attempts per file, so an offline machine gives up in
    about ``timeout`` seconds; a download that is making progress is never cut short. Raises DownloadError.
    """
    paths, _ = _download(split, root, timeout)
    return paths


def _download(
    split: str, root: str | os.PathLike[str] | None, timeout: float
) -> tuple[tuple[Path, Path], tuple[str, str]]:
    """Like download_fashion_mnist, also returning where each file came from (URL, or path if kept)."""
    names = _split_files(split)
    target = Path(root).expanduser() if root is not None else user_cache_dir() / "fashion-mnist"
    attempts: list[str] = []
    paths: list[Path] = []
    sources: list[str] = []
    for name in names:
        dest = target / name
        paths.append(dest)
        if dest.is_file():
            sources.append(str(dest))
            continue
        deadline = time.monotonic() + timeout
        for mirror in _mirrors():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                attempts.append(f"{name}: gave up after {timeout:.1f} s")
                break
            url = mirror + name
            try:
                _fetch(url, dest, sha256=FASHION_MNIST_SHA256[name], max_bytes=FASHION_MNIST_SIZES[name],
                       timeout=min(timeout, remaining))
                sources.append(url)
                break
            except (OSError, ChecksumError) as e:  # URLError and socket timeouts are OSErrors
                attempts.append(f"{url}: {_one_line(str(e)) or type(e).__name__}")
        if len(sources) < len(paths):
            raise DownloadError(attempts)
    return (paths[0], paths[1]), (sources[0], sources[1])


# ------------------------------------------------------------------------------------------------------------
# Loading Fashion-MNIST
# ------------------------------------------------------------------------------------------------------------


def _load_checked(path: Path, verify: bool) -> np.ndarray:
    if not verify:
        return _parse_idx(_read_file(path)[1], path)
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
        return _parse_idx(_read_file(path)[1] if raw[:2] == _GZIP_MAGIC else raw, path)
    try:  # a recompressed .gz: other bytes, same content
        payload = _read_file(path)[1]
        if raw[:2] == _GZIP_MAGIC and hashlib.sha256(payload).hexdigest() == want_raw:
            return _parse_idx(payload, path)
    except ValueError:
        pass
    published = FASHION_MNIST_SIZES[base + ".gz"]
    size = f"{len(raw)} bytes; the published file has {published}"
    if raw[:2] == _GZIP_MAGIC and len(raw) < published:
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
    (``verify=False`` skips that, e.g. for files you made yourself), ValueError when a file is not valid IDX.
    """
    names = _split_files(split)
    found = find_fashion_mnist(split, data_dir=data_dir)
    source: str | None = None
    if found is None:
        searched = fashion_mnist_search_path(data_dir)
        if not download:
            raise DataNotFound("Fashion-MNIST", names, searched, "disabled")
        try:
            found, (source, _) = _download(split, None, timeout)
        except DownloadError as e:
            raise DataNotFound("Fashion-MNIST", names, searched, f"failed: {e}") from e
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
        classes=_FASHION_MNIST_CLASSES,
    )


# ------------------------------------------------------------------------------------------------------------
# The generated sample dataset
# ------------------------------------------------------------------------------------------------------------

_SAMPLE_CLASSES = (
    "horizontal bar", "vertical bar", "ring", "disc", "cross",
    "diagonal", "checkerboard", "corner blob", "frame", "noise patch",
)

# Pixel-centre coordinates, broadcast against per-sample parameters of shape (m, 1, 1).
_YY = np.arange(28, dtype=np.float32).reshape(1, 28, 1)
_XX = np.arange(28, dtype=np.float32).reshape(1, 1, 28)


def _soft(v: np.ndarray) -> np.ndarray:
    # A one-pixel linear ramp instead of a hard threshold: sub-pixel sizes and positions then change pixels,
    # so jitter produces real variety rather than a handful of aliased copies.
    return np.clip(v + 0.5, 0.0, 1.0)


def _render_class(c: int, m: int, g: torch.Generator) -> np.ndarray:
    """``m`` images (m×28×28 float32 in [0, 1]) of sample class ``c``; all randomness from ``g``."""

    def u(lo: float, hi: float) -> np.ndarray:
        return (lo + (hi - lo) * torch.rand(m, 1, 1, generator=g)).numpy()

    y, x = _YY, _XX
    dy, dx = y - u(11.5, 16.5), x - u(11.5, 16.5)
    if c == 0:  # horizontal bar
        return _soft(u(1.2, 2.5) - np.abs(dy)) * _soft(u(7.0, 11.0) - np.abs(dx))
    if c == 1:  # vertical bar
        return _soft(u(1.2, 2.5) - np.abs(dx)) * _soft(u(7.0, 11.0) - np.abs(dy))
    if c == 2:  # ring
        r = np.sqrt(dy * dy + dx * dx)
        return _soft(u(0.8, 1.6) - np.abs(r - u(5.0, 7.5)))
    if c == 3:  # filled disc
        return _soft(u(3.5, 6.0) - np.sqrt(dy * dy + dx * dx))
    if c == 4:  # cross (plus sign)
        arm, th = u(6.0, 10.0), u(0.8, 1.8)
        h = _soft(th - np.abs(dy)) * _soft(arm - np.abs(dx))
        v = _soft(th - np.abs(dx)) * _soft(arm - np.abs(dy))
        return np.maximum(h, v)
    if c == 5:  # diagonal stroke, top-left to bottom-right
        across, along = (dx - dy) * np.float32(math.sqrt(0.5)), (dx + dy) * np.float32(math.sqrt(0.5))
        return _soft(u(0.8, 1.8) - np.abs(across)) * _soft(u(8.0, 13.0) - np.abs(along))
    if c == 6:  # checkerboard in a large square
        cell, half = u(2.5, 4.0), u(8.0, 11.0)
        oy, ox = u(0.0, 8.0), u(0.0, 8.0)
        checker = np.remainder(np.floor((y + oy) / cell) + np.floor((x + ox) / cell), 2.0)
        return checker * _soft(half - np.abs(dy)) * _soft(half - np.abs(dx))
    if c == 7:  # Gaussian blob near one of the four corners
        corner = torch.randint(0, 4, (m, 1, 1), generator=g).numpy()
        by = np.where(corner // 2 == 0, 5.0, 22.0).astype(np.float32) + u(-1.5, 1.5)
        bx = np.where(corner % 2 == 0, 5.0, 22.0).astype(np.float32) + u(-1.5, 1.5)
        sigma = u(2.5, 3.8)
        return np.exp(-((y - by) ** 2 + (x - bx) ** 2) / (2.0 * sigma * sigma))
    if c == 8:  # square frame
        cheb = np.maximum(np.abs(dy), np.abs(dx))
        return _soft(u(0.8, 1.6) - np.abs(cheb - u(8.0, 11.0)))
    if c == 9:  # small square of per-pixel noise
        half = u(3.5, 6.0)
        texture = torch.rand(m, 28, 28, generator=g).numpy()
        return texture * _soft(half - np.abs(dy)) * _soft(half - np.abs(dx))
    raise AssertionError(c)


def make_sample(n: int = 2048, *, seed: int = 0) -> ImageDataset:
    """A deterministic synthetic dataset: ``n`` 1×28×28 uint8 images of 10 shape classes.

    Classes: horizontal bar, vertical bar, ring, disc, cross, diagonal, checkerboard, corner blob, frame,
    noise patch; each sample has random position, size and intensity, plus mild pixel noise. Labels are
    balanced (counts differ by at most one). The same ``(n, seed)`` always gives the same tensors on a given
    machine; the global RNG is never touched.
    """
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"make_sample needs n >= 1, got {n}")
    # Random numbers come from a torch.Generator (the project's rule); the arithmetic runs in numpy because
    # numpy's element-wise ops are single-threaded. On a 2-core box next to another busy process, the same
    # code in torch took 0.7-1.4 s (each small op waited for its OpenMP team) against ~0.04 s in numpy.
    g = torch.Generator().manual_seed(int(seed))
    k = len(_SAMPLE_CLASSES)
    labels = (torch.arange(n, dtype=torch.int64) % k)[torch.randperm(n, generator=g)]
    lab = labels.numpy()
    out = np.empty((n, 28, 28), dtype=np.float32)
    for c in range(k):
        idx = np.flatnonzero(lab == c)
        m = int(idx.size)
        if m == 0:
            continue
        amp = (0.55 + 0.45 * torch.rand(m, 1, 1, generator=g)).numpy()
        out[idx] = _render_class(c, m, g) * amp
    out += np.float32(0.04) * torch.randn(n, 28, 28, generator=g).numpy()
    np.clip(out, 0.0, 1.0, out=out)
    out *= np.float32(255.0)
    images = torch.from_numpy(np.rint(out).astype(np.uint8)).unsqueeze(1)
    return ImageDataset(name="sample", images=images, labels=labels, source="generated", classes=k)


# ------------------------------------------------------------------------------------------------------------
# Choosing a dataset by name
# ------------------------------------------------------------------------------------------------------------

# The sample "test" split uses another seed so evaluating on it never scores the training images.
_SAMPLE_SEEDS = {"train": 0, "test": 1}


def _sample_for(split: str) -> ImageDataset:
    _split_files(split)  # same split names and error as Fashion-MNIST
    return make_sample(seed=_SAMPLE_SEEDS[split])


def resolve_images(
    name: str = "auto",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    warn: Callable[[str], Any] | None = None,
    split: str = "train",
) -> ImageDataset:
    """The image dataset called ``name``: "fashionmnist", "sample", or "auto".

    "auto" tries Fashion-MNIST (download included, if allowed) and on DataNotFound calls ``warn`` once with a
    one-line message and returns the generated sample (seed 0 for "train", 1 for "test"). Corrupt or
    mismatching local files are errors, not a reason to fall back: silently training on shapes when the user
    pointed at real data would hide the problem.
    """
    key = name.lower() if isinstance(name, str) else name
    if key == "fashionmnist":
        return load_fashion_mnist(split, data_dir=data_dir, download=download)
    if key == "sample":
        return _sample_for(split)
    if key == "auto":
        return real_or_sample(lambda: load_fashion_mnist(split, data_dir=data_dir, download=download),
                              lambda: _sample_for(split), what="dataset", warn=warn)
    raise ValueError(f"unknown image dataset {name!r}; valid names: {', '.join(_IMAGE_NAMES)}")


def real_or_sample(load_real: Callable[[], Any], make_sample: Callable[[], Any], *, what: str,
                   warn: Callable[[str], Any] | None) -> Any:
    """``load_real()``, or, when the real data can be neither found nor downloaded, one warning (through ``warn``,
    else ``warnings.warn``) and ``make_sample()``. Only DataNotFound falls back: a corrupt file is an error."""
    try:
        return load_real()
    except DataNotFound as e:
        msg = _one_line(f"warning: {e.summary}; using the generated 'sample' {what} instead — "
                        "set EPX_DATA_DIR or pass --data-dir for real data")
        if warn is None:
            warnings.warn(msg, UserWarning, stacklevel=3)
        else:
            warn(msg)
        return make_sample()


def _resolve_kind(name: str, kind: str, **kw: Any) -> Any:
    """``name`` ("sample" or "auto") among the datasets of ``kind``."""
    if kind == "images":
        return resolve_images(name, **kw)
    if kind == "text":
        # Imported here: ep_core.text builds on this module, so a top-level import would be circular.
        from ep_core.text import resolve_text

        return resolve_text(name, **kw)
    raise ValueError(f"unknown data kind {kind!r}; valid kinds: {', '.join(DATA_KINDS)}")


# Every factory takes ``kind`` so the caller need not know which ones care; fashionmnist and shakespeare
# return their own kind regardless, and the caller reports a mismatch with what its model needs.


def fashionmnist_dataset(
    *, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
    warn: Callable[[str], Any] | None = None, split: str = "train", kind: str = "images",
) -> ImageDataset:
    return resolve_images("fashionmnist", data_dir=data_dir, download=download, warn=warn, split=split)


def shakespeare_dataset(
    *, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
    warn: Callable[[str], Any] | None = None, split: str = "train", kind: str = "text",
) -> Any:
    from ep_core.text import resolve_text  # circular at the top level, see _resolve_kind

    return resolve_text("shakespeare", data_dir=data_dir, download=download, warn=warn, split=split)


def sample_dataset(
    *, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
    warn: Callable[[str], Any] | None = None, split: str = "train", kind: str = "images",
) -> Any:
    return _resolve_kind("sample", kind, data_dir=data_dir, download=download, warn=warn, split=split)


def auto_dataset(
    *, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
    warn: Callable[[str], Any] | None = None, split: str = "train", kind: str = "images",
) -> Any:
    return _resolve_kind("auto", kind, data_dir=data_dir, download=download, warn=warn, split=split)
