"""Image classification data: the :class:`ImageDataset` every image dataset returns, the IDX file format, and the
generated ``sample`` images.

:class:`ImageDataset` holds uint8 N×C×H×W images and int64 labels in memory. Its ``batch`` draws a random subset
from a caller's generator, scales it to [0, 1], optionally augments it (seed 004's random crop with zero padding
and horizontal flip) and, when asked (``normalize=True``: a model whose DataSpec says so, resmlp), standardises
it with the dataset's per-channel ``normalization`` (CIFAR-10's and Fashion-MNIST's published training-set
statistics; the sample has none and stays in [0, 1]).

:func:`make_sample` draws 10 classes of shapes (bars, rings, discs, ...) in any C×H×W: the shapes are laid out on
a 28×28 frame stretched over the image, so 1×28×28 (the default) is the set cet was measured on, bit for bit.
"""

from __future__ import annotations

import gzip
import math
import operator
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ep_core.datasets.store import as_int
from ep_core.errors import FileFormatError

__all__ = ["AUGMENT_PADDING", "GZIP_MAGIC", "SAMPLE_SHAPE", "ImageDataset", "make_sample", "parse_idx", "read_idx",
           "read_payload", "sample_images"]

#: Zero padding of the random crop (seed 004: torchvision's RandomCrop(32, padding=4)).
AUGMENT_PADDING = 4

GZIP_MAGIC = b"\x1f\x8b"
_IDX_UINT8 = 0x08


# ------------------------------------------------------------------------------------------------------------
# The dataset object
# ------------------------------------------------------------------------------------------------------------


def _kind(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} with shape {tuple(t.shape)}"
    return type(t).__name__


Normalization = tuple[tuple[float, ...], tuple[float, ...]]


# eq=False: dataclass equality would compare tensors element-wise and raise; identity is what callers want.
@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An in-memory image classification dataset.

    ``images`` is uint8 N×C×H×W (0..255), ``labels`` is int64 N in ``[0, classes)``. ``source`` is the file
    the images were read from, the URL they were downloaded from, or ``"generated"``. ``normalization``, if
    given, is (mean, std) per channel in [0, 1] units, applied by :meth:`batch` as (x − mean) / std when it is
    asked to normalise.
    """

    kind: ClassVar[str] = "images"

    name: str
    images: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    source: str
    classes: int
    normalization: Normalization | None = None

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
        if self.normalization is not None:
            mean, std = self.normalization
            channels = int(img.shape[1])
            if len(mean) != channels or len(std) != channels:
                raise ValueError(f"{self.name}: normalization needs one mean and one std per channel ({channels}), "
                                 f"got {len(mean)} and {len(std)}")
            if not all(math.isfinite(s) and s > 0 for s in std) or not all(math.isfinite(m) for m in mean):
                raise ValueError(f"{self.name}: normalization needs finite means and stds > 0, "
                                 f"got {self.normalization}")

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
        augment: bool = False,
        normalize: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random subset without replacement: images in ``dtype``, scaled to [0, 1] and, with ``normalize``,
        standardised with the dataset's ``normalization`` if it has one; int64 labels.

        ``augment``: each image is padded with AUGMENT_PADDING zero pixels on every side, cropped back to its size
        at a random offset and flipped left-right with probability 1/2 (seed 004's training augmentation; the
        padding is black before normalisation, as in torchvision). Everything random, the subset included, comes
        from ``generator`` alone, so the same generator state gives the same batch.
        """
        n = self.n
        size = as_int("batch size", size)
        if not 1 <= size <= n:
            raise ValueError(f"batch size {size} is out of range for dataset {self.name!r} with N={n} "
                             f"samples (need 1 <= size <= {n})")
        if not dtype.is_floating_point:
            raise ValueError(f"batch dtype must be floating point, got {dtype}")
        # randperm must run where the generator lives; the index itself is used on the CPU copy.
        idx = torch.randperm(n, generator=generator, device=generator.device)[:size].cpu()
        images = self.images[idx]
        if augment:
            images = _crop_and_flip(images, generator)
        # Move uint8 before converting: a quarter of the bytes of a float32 copy cross the bus.
        x = images.to(device=device).to(dtype).div_(255)
        if normalize and self.normalization is not None:
            mean, std = (torch.tensor(v, dtype=dtype, device=x.device).view(1, -1, 1, 1) for v in self.normalization)
            x = x.sub_(mean).div_(std)
        y = self.labels[idx].to(device=device)
        return x, y

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the data actually used, for results."""
        record: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "n": self.n,
            "shape": [int(s) for s in self.images.shape[1:]],
            "classes": int(self.classes),
        }
        if self.normalization is not None:
            record["normalization"] = {"mean": list(self.normalization[0]), "std": list(self.normalization[1])}
        return record


def _crop_and_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the zero-padded ``images`` (uint8 B×C×H×W) at their own size, half of them mirrored."""
    b, c, h, w = images.shape
    pad = AUGMENT_PADDING
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=generator.device).cpu()
    flips = torch.randint(0, 2, (b,), generator=generator, device=generator.device).cpu().bool()
    padded = torch.zeros((b, c, h + 2 * pad, w + 2 * pad), dtype=images.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = images
    rows = offsets[0][:, None] + torch.arange(h)
    columns = torch.arange(w).expand(b, w)
    # A flip reads the crop's columns right to left, which is the same as flipping after the crop.
    columns = torch.where(flips[:, None], w - 1 - columns, columns) + offsets[1][:, None]
    # Advanced indices on either side of the channel slice put their broadcast shape (B, H, W) first.
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], columns[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------------------
# IDX parsing
# ------------------------------------------------------------------------------------------------------------


def read_payload(path: Path) -> tuple[bytes, bytes]:
    """(bytes on disk, IDX payload). Compression is decided by the gzip magic, so names cannot lie."""
    raw = path.read_bytes()
    if raw[:2] != GZIP_MAGIC:
        return raw, raw
    try:
        return raw, gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise FileFormatError(path, f"corrupt gzip data ({e})") from None


def parse_idx(payload: bytes, path: Path) -> np.ndarray:
    """The uint8 array an IDX ``payload`` (read from ``path``, named in errors) declares."""
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
    _, payload = read_payload(path)
    return parse_idx(payload, path)


# ------------------------------------------------------------------------------------------------------------
# The generated sample images
# ------------------------------------------------------------------------------------------------------------

_SAMPLE_CLASSES = (
    "horizontal bar", "vertical bar", "ring", "disc", "cross",
    "diagonal", "checkerboard", "corner blob", "frame", "noise patch",
)

#: The frame the shapes are drawn on, in pixels; an image of another size samples it at its own pixel centres.
_FRAME = 28

#: The sample's own shape, used when the caller asks for none.
SAMPLE_SHAPE = (1, _FRAME, _FRAME)

# The sample "test" split uses another seed so evaluating on it never scores the training images.
_SAMPLE_SEEDS = {"train": 0, "test": 1}


def _frame_coordinates(size: int) -> np.ndarray:
    # Pixel centres of a row of ``size`` pixels in frame units; exactly 0, 1, ..., 27 when size is 28.
    return ((np.arange(size, dtype=np.float64) + 0.5) * (_FRAME / size) - 0.5).astype(np.float32)


def _soft(v: np.ndarray) -> np.ndarray:
    # A one-pixel linear ramp instead of a hard threshold: sub-pixel sizes and positions then change pixels,
    # so jitter produces real variety rather than a handful of aliased copies.
    return np.clip(v + 0.5, 0.0, 1.0)


def _render_class(c: int, m: int, g: torch.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``m`` images (m×H×W float32 in [0, 1]) of sample class ``c`` at frame coordinates ``y`` (1×H×1) and
    ``x`` (1×1×W); all randomness from ``g``."""

    def u(lo: float, hi: float) -> np.ndarray:
        return (lo + (hi - lo) * torch.rand(m, 1, 1, generator=g)).numpy()

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
        texture = torch.rand(m, y.shape[1], x.shape[2], generator=g).numpy()
        return texture * _soft(half - np.abs(dy)) * _soft(half - np.abs(dx))
    raise AssertionError(c)


def _check_shape(shape: object) -> tuple[int, int, int]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise ValueError(f"an image sample shape is (channels, height, width), each an integer >= 1; got {shape!r}")
    channels, height, width = shape
    return channels, height, width


def make_sample(n: int = 2048, *, seed: int = 0, shape: tuple[int, int, int] = SAMPLE_SHAPE) -> ImageDataset:
    """A deterministic synthetic dataset: ``n`` uint8 images of ``shape`` (C, H, W) in 10 shape classes.

    Classes: horizontal bar, vertical bar, ring, disc, cross, diagonal, checkerboard, corner blob, frame,
    noise patch; each sample has random position, size and intensity, plus mild pixel noise. With several
    channels each sample gets its own intensity per channel (a tint). Labels are balanced (counts differ by at
    most one). The same ``(n, seed, shape)`` always gives the same tensors on a given machine; the global RNG is
    never touched.
    """
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"make_sample needs n >= 1, got {n}")
    channels, height, width = _check_shape(shape)
    # Random numbers come from a torch.Generator (the project's rule); the arithmetic runs in numpy because
    # numpy's element-wise ops are single-threaded. On a 2-core box next to another busy process, the same
    # code in torch took 0.7-1.4 s (each small op waited for its OpenMP team) against ~0.04 s in numpy.
    g = torch.Generator().manual_seed(int(seed))
    y = _frame_coordinates(height).reshape(1, height, 1)
    x = _frame_coordinates(width).reshape(1, 1, width)
    k = len(_SAMPLE_CLASSES)
    labels = (torch.arange(n, dtype=torch.int64) % k)[torch.randperm(n, generator=g)]
    lab = labels.numpy()
    out = np.empty((n, channels, height, width), dtype=np.float32)
    for c in range(k):
        idx = np.flatnonzero(lab == c)
        m = int(idx.size)
        if m == 0:
            continue
        # One draw per sample and channel: with one channel the same numbers, in the same order, as ever.
        amp = (0.55 + 0.45 * torch.rand(m, channels, 1, 1, generator=g)).numpy()
        out[idx] = _render_class(c, m, g, y, x)[:, None] * amp
    out += np.float32(0.04) * torch.randn(n, channels, height, width, generator=g).numpy()
    np.clip(out, 0.0, 1.0, out=out)
    out *= np.float32(255.0)
    images = torch.from_numpy(np.rint(out).astype(np.uint8))
    return ImageDataset(name="sample", images=images, labels=labels, source="generated", classes=k)


def sample_images(split: str = "train", shape: tuple[int, int, int] | None = None) -> ImageDataset:
    """The generated sample's ``split`` ("train": seed 0, "test": seed 1) in ``shape`` (None: 1×28×28)."""
    if split not in _SAMPLE_SEEDS:
        raise ValueError(f"unknown split {split!r} of the generated sample; valid: {', '.join(_SAMPLE_SEEDS)}")
    return make_sample(seed=_SAMPLE_SEEDS[split], shape=SAMPLE_SHAPE if shape is None else shape)
