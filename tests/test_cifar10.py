"""Tests for ep_core.datasets.cifar10 and the CIFAR-10 side of ImageDataset (normalisation, augmentation).

CIFAR-10 cannot be had offline, so the loader is tested on small files in the official binary layout made here:
3073-byte records (a label byte, then the red, green and blue 32×32 planes, each row by row), 20 per batch file,
in ``cifar-10-batches-bin/`` inside a gzip'd tar like ``cifar-10-binary.tar.gz``. The production checksums stay
strict: the tests that need a made archive to verify patch the expected SHA-256 and size.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ep_core.datasets import cifar10, store
from ep_core.datasets.cifar10 import CIFAR10_SHA256, load_cifar10
from ep_core.datasets.images import AUGMENT_PADDING, ImageDataset
from ep_core.datasets.store import DataNotFound
from ep_core.errors import ChecksumError, FileFormatError
from ep_core.plugins import load
from ep_core.protocols import DataSpec
from ep_core.session import load_data

PER_FILE = 20
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]


def _pattern(c: int, y: int, x: int) -> int:
    return (7 * c + 3 * y + x) % 256


def _records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``n`` records in the official byte order; (bytes, labels, images N×3×32×32) for comparison."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    images[0] = [[[_pattern(c, y, x) for x in range(32)] for y in range(32)] for c in range(3)]
    out = bytearray()
    for i in range(n):
        out.append(int(labels[i]))
        # Written pixel by pixel in the documented order, not by a reshape, so a layout bug cannot cancel out.
        for c in range(3):
            for y in range(32):
                out.extend(int(images[i, c, y, x]) for x in range(32))
    return bytes(out), labels.astype(np.int64), images


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The files of a small CIFAR-10: name -> bytes, and the expected arrays per split."""
    files, labels, images = {}, {"train": [], "test": []}, {"train": [], "test": []}
    for seed, name in enumerate([*TRAIN_FILES, "test_batch.bin"]):
        raw, lab, img = _records(PER_FILE, seed)
        files[name] = raw
        split = "test" if name == "test_batch.bin" else "train"
        labels[split].append(lab)
        images[split].append(img)
    expected = {split: (np.concatenate(images[split]), np.concatenate(labels[split])) for split in labels}
    return files, expected


def _archive(made, path: Path, *, drop: str | None = None) -> Path:
    files, _ = made
    # The official archive holds metadata too, and not in split order: the reader must pick members by name.
    members = {"cifar-10-batches-bin/readme.html": b"<html></html>",
               "cifar-10-batches-bin/batches.meta.txt": b"airplane\nautomobile\n"}
    for name in ["test_batch.bin", *reversed(TRAIN_FILES)]:
        if name != drop:
            members[f"cifar-10-batches-bin/{name}"] = files[name]
    return _tar(path, members)


def _extract(made, directory: Path) -> Path:
    files, _ = made
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return directory


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No EPX_DATA_DIR, cache and HOME under tmp_path, and no download unless a test arranges one."""
    monkeypatch.delenv("EPX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def fail(url, *a, **k):
        raise RuntimeError(f"unexpected network access in tests: {url}")

    monkeypatch.setattr(store, "fetch", fail)
    return tmp_path


_real_fetch = store.fetch


def _accept(monkeypatch, archive: Path) -> None:
    """Make ``archive`` the published one, for the tests of the verified path."""
    monkeypatch.setattr(cifar10, "CIFAR10_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(cifar10, "CIFAR10_SIZE", archive.stat().st_size)


# ------------------------------------------------------------------------------------------------------------
# Reading the binary format
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split, n", [("train", 5 * PER_FILE), ("test", PER_FILE)])
def test_pixels_and_labels_round_trip_from_the_tarball(made, isolated, split, n):
    archive = _archive(made, isolated / "root" / "cifar-10" / "cifar-10-binary.tar.gz")
    ds = load_cifar10(split, data_dir=isolated / "root", download=False, verify=False)
    images, labels = made[1][split]
    assert ds.name == "cifar10" and ds.classes == 10 and ds.source == str(archive)
    assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert np.array_equal(ds.images.numpy(), images) and np.array_equal(ds.labels.numpy(), labels)
    # The first record of every file carries a known pattern: channel, row and column land where they belong.
    for c, y, x in [(0, 0, 0), (0, 0, 31), (1, 5, 2), (2, 31, 30), (2, 17, 0)]:
        assert int(ds.images[0, c, y, x]) == _pattern(c, y, x)
    assert ds.describe() == {"name": "cifar10", "source": str(archive), "n": n, "shape": [3, 32, 32],
                             "classes": 10, "normalization": {"mean": [0.4914, 0.4822, 0.4465],
                                                              "std": [0.2470, 0.2435, 0.2616]}}


def test_extracted_directory_is_read_and_preferred(made, isolated):
    root = isolated / "root"
    _archive(made, root / "cifar-10-binary.tar.gz")
    directory = _extract(made, root / "cifar-10-batches-bin")
    ds = load_cifar10("train", data_dir=root, download=False, verify=False)
    assert ds.source == str(directory)
    assert np.array_equal(ds.images.numpy(), made[1]["train"][0])
    # A directory that lacks a file of the split does not count; the tarball beside it is used.
    (directory / "data_batch_3.bin").unlink()
    assert load_cifar10("train", data_dir=root, download=False, verify=False).source == str(
        root / "cifar-10-binary.tar.gz")
    assert load_cifar10("test", data_dir=root, download=False, verify=False).source == str(directory)


def test_search_order_data_dir_then_env_then_cache(made, isolated, monkeypatch):
    for place in ("arg", "env", "xdg/epx"):
        _archive(made, isolated / place / "cifar-10" / "cifar-10-binary.tar.gz")
    monkeypatch.setenv("EPX_DATA_DIR", str(isolated / "env"))
    assert load_cifar10("test", data_dir=isolated / "arg", download=False, verify=False).source.startswith(
        str(isolated / "arg"))
    assert load_cifar10("test", download=False, verify=False).source.startswith(str(isolated / "env"))
    monkeypatch.delenv("EPX_DATA_DIR")
    assert load_cifar10("test", download=False, verify=False).source.startswith(str(isolated / "xdg" / "epx"))


def test_verified_archive_loads_through_the_registry(made, isolated, monkeypatch):
    archive = _archive(made, isolated / "root" / "cifar-10-binary.tar.gz")
    _accept(monkeypatch, archive)
    registry = load(entry_points=False)
    spec = DataSpec(kind="images", shape=lambda config: (3, 32, 32), datasets=("cifar10", "fashionmnist"))
    ds = load_data(registry, "auto", spec=spec, data_dir=str(isolated / "root"), download=False, warn=pytest.fail)
    assert ds.name == "cifar10" and len(ds) == 5 * PER_FILE
    held_out = load_data(registry, "cifar10", spec=spec, data_dir=str(isolated / "root"), download=False,
                         split="test")
    assert len(held_out) == PER_FILE


def test_verified_extracted_files(made, isolated, monkeypatch):
    files, _ = made
    directory = _extract(made, isolated / "root" / "cifar-10" / "cifar-10-batches-bin")
    monkeypatch.setattr(cifar10, "CIFAR10_FILE_SHA256", {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    monkeypatch.setattr(cifar10, "FILE_SIZE", PER_FILE * 3073)
    assert load_cifar10("test", data_dir=isolated / "root", download=False).source == str(directory)
    (directory / "test_batch.bin").write_bytes(files["test_batch.bin"][:-3073])
    with pytest.raises(ChecksumError, match="test_batch.bin.*truncated"):
        load_cifar10("test", data_dir=isolated / "root", download=False)


def test_unknown_split():
    with pytest.raises(ValueError, match="valid: train, test"):
        load_cifar10("val", download=False)


# ------------------------------------------------------------------------------------------------------------
# Corrupt, truncated, missing
# ------------------------------------------------------------------------------------------------------------


def test_truncated_tarball_names_the_file_and_the_expected_sha256(made, isolated):
    archive = _archive(made, isolated / "root" / "cifar-10-binary.tar.gz")
    archive.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(ChecksumError) as caught:
        load_cifar10("train", data_dir=isolated / "root", download=False)
    message = str(caught.value)
    assert str(archive) in message and CIFAR10_SHA256 in message and "truncated" in message
    assert "170052171" in message
    # Without the checksum the damage is still found, by the archive reader, and named the same way.
    with pytest.raises(FileFormatError, match=f"{archive}: not a readable gzip'd tar archive"):
        load_cifar10("train", data_dir=isolated / "root", download=False, verify=False)


def test_production_check_is_strict(made, isolated):
    """A well-formed archive that is not the published one is refused by every verified path."""
    _archive(made, isolated / "root" / "cifar-10" / "cifar-10-binary.tar.gz")
    with pytest.raises(ChecksumError, match=CIFAR10_SHA256):
        load_data(load(entry_points=False), "cifar10", spec=DataSpec(kind="images", shape=lambda c: (3, 32, 32)),
                  data_dir=str(isolated / "root"), download=False)
    directory = _extract(made, isolated / "other" / "cifar-10-batches-bin")
    with pytest.raises(ChecksumError) as caught:
        load_cifar10("test", data_dir=isolated / "other", download=False)
    assert str(directory / "test_batch.bin") in str(caught.value)
    assert cifar10.CIFAR10_FILE_SHA256["test_batch.bin"] in str(caught.value)


def test_bad_records_are_format_errors_naming_the_file(made, isolated):
    files, _ = made
    directory = _extract(made, isolated / "root" / "cifar-10-batches-bin")
    (directory / "test_batch.bin").write_bytes(files["test_batch.bin"] + b"\x00")
    with pytest.raises(FileFormatError, match=r"test_batch.bin: 61461 bytes is not a whole number of 3073-byte"):
        load_cifar10("test", data_dir=isolated / "root", download=False, verify=False)
    bad = bytearray(files["test_batch.bin"])
    bad[3073 * 4] = 10
    (directory / "test_batch.bin").write_bytes(bytes(bad))
    with pytest.raises(FileFormatError, match="test_batch.bin: record 4 has label 10, outside 0..9"):
        load_cifar10("test", data_dir=isolated / "root", download=False, verify=False)
    (directory / "test_batch.bin").write_bytes(b"")
    with pytest.raises(FileFormatError, match="0 bytes"):
        load_cifar10("test", data_dir=isolated / "root", download=False, verify=False)


def test_archive_without_a_member_is_a_format_error(made, isolated):
    archive = _archive(made, isolated / "root" / "cifar-10-binary.tar.gz", drop="data_batch_4.bin")
    with pytest.raises(FileFormatError, match=f"{archive}: has no member cifar-10-batches-bin/data_batch_4.bin"):
        load_cifar10("train", data_dir=isolated / "root", download=False, verify=False)
    assert len(load_cifar10("test", data_dir=isolated / "root", download=False, verify=False)) == PER_FILE


def test_missing_is_data_not_found_naming_places_and_how_to_get_it(isolated):
    with pytest.raises(DataNotFound) as caught:
        load_cifar10(data_dir=isolated / "arg", download=False)
    err = caught.value
    assert list(err.searched) == [isolated / "arg", isolated / "xdg" / "epx"]
    message = str(err)
    for root in err.searched:
        assert f"  - {root}  (does not exist)" in message
    assert message.startswith("CIFAR-10 not found: no root holds cifar-10-binary.tar.gz or cifar-10-batches-bin/")
    for fragment in ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", CIFAR10_SHA256, "<root>/cifar-10/",
                     "EPX_DATA_DIR", "--data-dir", "Download: disabled", "python version",
                     str(isolated / "xdg" / "epx" / "cifar-10" / "cifar-10-binary.tar.gz")):
        assert fragment in message
    assert "\n" not in err.summary


def test_download_into_the_cache_then_found_there(made, isolated, monkeypatch):
    monkeypatch.setattr(store, "fetch", _real_fetch)
    archive = _archive(made, isolated / "mirror" / "cifar-10-binary.tar.gz")
    wrong = _archive(made, isolated / "wrong" / "cifar-10-binary.tar.gz", drop="test_batch.bin")
    _accept(monkeypatch, archive)
    urls = (wrong.as_uri(), archive.as_uri())
    monkeypatch.setattr(cifar10, "CIFAR10_URLS", urls)
    ds = load_cifar10("test", download=True)
    assert ds.source == urls[1] and len(ds) == PER_FILE
    cache = isolated / "xdg" / "epx" / "cifar-10"
    assert [p.name for p in cache.iterdir()] == ["cifar-10-binary.tar.gz"]
    monkeypatch.setattr(cifar10, "CIFAR10_URLS", ())
    assert load_cifar10("test", download=True).source == str(cache / "cifar-10-binary.tar.gz")


def test_failed_download_is_data_not_found(isolated, monkeypatch):
    def offline(url, dest, **kw):
        raise OSError("network is unreachable")

    monkeypatch.setattr(store, "fetch", offline)
    with pytest.raises(DataNotFound, match="Download: failed: .*cifar-10-binary.tar.gz: network is unreachable"):
        load_cifar10(download=True)


# ------------------------------------------------------------------------------------------------------------
# Normalisation and augmentation
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def train(made, isolated) -> ImageDataset:
    _archive(made, isolated / "root" / "cifar-10-binary.tar.gz")
    return load_cifar10("train", data_dir=isolated / "root", download=False, verify=False)


def test_normalisation_is_seed_004s_and_applied_by_batch_when_asked(train):
    assert train.normalization == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    x, y = train.batch(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64, normalize=True)
    idx = torch.randperm(train.n, generator=torch.Generator().manual_seed(0))[:16]
    assert torch.equal(y, train.labels[idx])
    raw = train.images[idx].double() / 255
    for c, (mean, std) in enumerate(zip(*train.normalization)):
        torch.testing.assert_close(x[:, c], (raw[:, c] - mean) / std, rtol=0, atol=1e-12)
    # Not asked, or without a normalization, the batch stays in [0, 1].
    unasked, _ = train.batch(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(unasked, raw)
    plain = ImageDataset("plain", train.images, train.labels, "generated", 10)
    x_plain, _ = plain.batch(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64, normalize=True)
    assert torch.equal(x_plain, raw)


def _unnormalised(ds: ImageDataset, x: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1) for v in ds.normalization)
    return (x * std + mean).mul(255).round().to(torch.uint8)


def test_augmentation_is_seeded_and_only_uses_the_generator(train):
    state = torch.get_rng_state()
    a, ya = train.batch(64, generator=torch.Generator().manual_seed(5), augment=True)
    b, yb = train.batch(64, generator=torch.Generator().manual_seed(5), augment=True)
    c, _ = train.batch(64, generator=torch.Generator().manual_seed(6), augment=True)
    plain, y_plain = train.batch(64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    # The subset is drawn first, so augmenting changes the pixels, never which samples are in the batch.
    assert torch.equal(ya, y_plain) and not torch.equal(a, plain)
    assert a.shape == plain.shape == (64, 3, 32, 32) and a.dtype == torch.float32


def test_augmentation_crops_the_zero_padded_image_and_flips_it(train):
    pad = AUGMENT_PADDING
    assert pad == 4
    x, _ = train.batch(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64, augment=True,
                       normalize=True)
    idx = torch.randperm(train.n, generator=torch.Generator().manual_seed(1))[:64]
    got = _unnormalised(train, x)
    padded = torch.nn.functional.pad(train.images[idx], (pad, pad, pad, pad))
    found = []
    for i in range(64):
        views = {(dy, dx, flip): padded[i, :, dy:dy + 32, dx:dx + 32].flip(-1) if flip
                 else padded[i, :, dy:dy + 32, dx:dx + 32]
                 for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)}
        matches = [key for key, view in views.items() if torch.equal(got[i], view)]
        assert len(matches) == 1, f"sample {i} is {len(matches)} crops of its padded image, flipped or not"
        found.append(matches[0])
    # Offsets over the whole range, both orientations; a crop at the top edge starts with the black padding.
    assert {dy for dy, _, _ in found} == {dx for _, dx, _ in found} == set(range(2 * pad + 1))
    assert 0 < sum(flip for _, _, flip in found) < 64
    top = next(i for i, (dy, _, _) in enumerate(found) if dy == 0)
    assert int(got[top, :, :pad].max()) == 0 and int(got[top, :, pad:].max()) > 0


def test_normalization_is_validated():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="one mean and one std per channel"):
        ImageDataset("x", images, labels, "generated", 1, normalization=((0.5,), (0.5,)))
    with pytest.raises(ValueError, match="stds > 0"):
        ImageDataset("x", images, labels, "generated", 1, normalization=((0.5,) * 3, (0.5, 0.0, 0.5)))


# ------------------------------------------------------------------------------------------------------------
# The sample in CIFAR-10's shape
# ------------------------------------------------------------------------------------------------------------


def test_auto_falls_back_to_the_sample_in_cifar_shape(isolated):
    spec = DataSpec(kind="images", shape=lambda config: (3, 32, 32), datasets=("cifar10",))
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_data(load(entry_points=False), "auto", spec=spec, download=False, warn=seen.append,
                       shape=(3, 32, 32))
    assert ds.name == "sample" and ds.images.shape == (2048, 3, 32, 32) and ds.normalization is None
    [message] = seen
    assert message.startswith("warning: CIFAR-10 not found") and str(isolated / "xdg" / "epx") in message
    x, _ = ds.batch(8, generator=torch.Generator().manual_seed(0), augment=True)
    assert x.shape == (8, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
