"""Tests for ep_core.datasets.text and .shakespeare: tiny Shakespeare (search, checksum, download, token cache),
the generated sample play, batches, and the text side of dataset registration and of auto."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ep_core.datasets import fashionmnist, shakespeare, store, text
from ep_core.datasets.images import ImageDataset
from ep_core.datasets.shakespeare import SHAKESPEARE_SHA256, SHAKESPEARE_SIZE, load_shakespeare
from ep_core.datasets.store import DataNotFound
from ep_core.datasets.text import TextDataset, make_text_sample
from ep_core.errors import ChecksumError, ConfigError
from ep_core.plugins import load
from ep_core.protocols import DataSpec
from ep_core.session import load_data

# ------------------------------------------------------------------------------------------------------------
# Real data and an isolated environment
# ------------------------------------------------------------------------------------------------------------

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _real_root() -> Path | None:
    for root in (os.environ.get("EPX_DATA_DIR"), _SHARED):
        if root and (Path(root) / "tinyshakespeare" / "input.txt").is_file():
            return Path(root)
    return None


REAL_ROOT = _real_root()
REAL_FILE = REAL_ROOT / "tinyshakespeare" / "input.txt" if REAL_ROOT else None
needs_real = pytest.mark.skipif(
    REAL_ROOT is None,
    reason=f"tiny Shakespeare not found: expected {_SHARED}/tinyshakespeare/input.txt "
    "or $EPX_DATA_DIR/tinyshakespeare/input.txt",
)

N_CHARS = 1_115_394
N_TRAIN = 1_003_854
N_VAL = 111_540
CACHE_KEY = SHAKESPEARE_SHA256[:16]


@pytest.fixture(scope="module")
def raw_text() -> str:
    assert REAL_FILE is not None
    return REAL_FILE.read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Cache and HOME under tmp_path, and no download unless a test arranges one. EPX_DATA_DIR is kept."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def fail(url, *a, **k):
        raise RuntimeError(f"unexpected network access in tests: {url}")

    monkeypatch.setattr(store, "fetch", fail)
    return tmp_path


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("EPX_DATA_DIR", raising=False)


_real_fetch = store.fetch

#: A text model's data as ep_core.session.load_data sees them: auto tries tiny Shakespeare.
TEXT = DataSpec(kind="text", shape=lambda config: (64,), datasets=("shakespeare",))


def _auto(**kw):
    return load_data(load(entry_points=False), "auto", spec=TEXT, **kw)


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "xdg" / "epx" / "text" / CACHE_KEY


# ------------------------------------------------------------------------------------------------------------
# Real tiny Shakespeare
# ------------------------------------------------------------------------------------------------------------


@needs_real
def test_real_shakespeare_sizes_vocab_and_splits(raw_text):
    assert len(raw_text) == N_CHARS and int(N_CHARS * 0.9) == N_TRAIN and N_TRAIN + N_VAL == N_CHARS
    train = load_shakespeare(data_dir=REAL_ROOT, download=False)
    val = load_shakespeare("val", data_dir=REAL_ROOT, download=False)
    test = load_shakespeare("test", data_dir=REAL_ROOT, download=False)
    assert (len(train), len(val), len(test)) == (N_TRAIN, N_VAL, N_VAL)
    assert train.split == "train" and val.split == "val" and test.split == "val"
    assert train.vocab_size == 65 and train.chars == "".join(sorted(set(raw_text))) == val.chars
    assert train.chars[:13] == "\n !$&',-.3:;?" and train.chars.endswith("xyz")
    assert train.tokens.dtype == np.uint16 and isinstance(train.tokens, np.memmap)
    assert np.array_equal(test.tokens, val.tokens)
    assert train.decode(train.tokens[:60]) == raw_text[:60]
    assert val.decode(val.tokens[:60]) == raw_text[N_TRAIN:N_TRAIN + 60]
    assert val.decode(val.tokens[-40:]) == raw_text[-40:]
    assert train.name == "shakespeare" and train.source == str(REAL_FILE) and train.kind == "text"
    d = val.describe()
    assert d == {"name": "shakespeare", "source": str(REAL_FILE), "kind": "text", "split": "val",
                 "tokens": N_VAL, "vocab_size": 65, "sha256": SHAKESPEARE_SHA256}
    assert json.loads(json.dumps(d)) == d


@needs_real
def test_found_through_epx_data_dir(monkeypatch):
    monkeypatch.setenv("EPX_DATA_DIR", str(REAL_ROOT))
    ds = shakespeare.dataset(download=False)
    assert ds.source == str(REAL_FILE) and len(ds) == N_TRAIN


@needs_real
def test_encode_decode(raw_text):
    ds = load_shakespeare(data_dir=REAL_ROOT, download=False)
    passage = raw_text[5000:5400]
    ids = ds.encode(passage)
    assert ids.dtype == torch.int64 and ids.shape == (400,)
    assert torch.equal(ids, torch.from_numpy(ds.tokens[5000:5400].astype(np.int64)))
    assert ds.decode(ids) == passage and ds.decode(ids.tolist()) == passage and ds.decode(ids.numpy()) == passage
    assert ds.encode("First Citizen:").tolist() == [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52, 10]
    assert ds.encode("").shape == (0,) and ds.decode([]) == ""
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\)"):
        ds.encode("Romeo é Juliet")
    with pytest.raises(ValueError, match="65.*0..64"):
        ds.decode([3, 65])
    with pytest.raises(ValueError, match="0..64"):
        ds.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="1-D"):
        ds.decode(np.zeros((2, 2), dtype=np.int64))


@needs_real
def test_batch_windows_come_from_the_text(raw_text):
    ds = load_shakespeare(data_dir=REAL_ROOT, download=False)
    size, context = 16, 32
    x, y = ds.batch(size, context=context, generator=torch.Generator().manual_seed(7))
    assert x.shape == y.shape == (size, context) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    starts = torch.randint(0, N_TRAIN - context, (size,), generator=torch.Generator().manual_seed(7)).tolist()
    for row, start in enumerate(starts):
        assert ds.decode(x[row]) == raw_text[start:start + context]
        assert ds.decode(y[row]) == raw_text[start + 1:start + context + 1]
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = ds.batch(size, context=context, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = ds.batch(size, context=context, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(x, x3)


@needs_real
def test_batch_rejects_bad_arguments():
    val = load_shakespeare("val", data_dir=REAL_ROOT, download=False)
    g = torch.Generator().manual_seed(0)
    x, y = val.batch(2, context=N_VAL - 1, generator=g)  # the longest window that fits
    assert torch.equal(x[0], x[1]) and val.decode(y[0][-5:]) == val.decode(val.tokens[-5:])
    with pytest.raises(ValueError, match=f"context {N_VAL}.*{N_VAL + 1} tokens.*val split.*only {N_VAL}"):
        val.batch(2, context=N_VAL, generator=g)
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        val.batch(0, context=8, generator=g)
    with pytest.raises(ValueError, match="context must be >= 1"):
        val.batch(4, context=0, generator=g)
    with pytest.raises(TypeError):
        val.batch(True, context=8, generator=g)
    with pytest.raises(TypeError):
        val.batch(4, context=8.0, generator=g)


# ------------------------------------------------------------------------------------------------------------
# The token cache
# ------------------------------------------------------------------------------------------------------------


@needs_real
def test_cache_written_then_reused(isolated, monkeypatch, raw_text):
    first = load_shakespeare(data_dir=REAL_ROOT, download=False)
    cache = _cache(isolated)
    assert sorted(p.name for p in cache.iterdir()) == ["tokens.u16", "vocab.json"]
    assert (cache / "tokens.u16").stat().st_size == 2 * N_CHARS
    meta = json.loads((cache / "vocab.json").read_text())
    assert meta == {"format": "epx.vocab/1", "chars": first.chars, "text_sha256": SHAKESPEARE_SHA256,
                    "tokens": N_CHARS, "split": N_TRAIN}
    on_disk = np.fromfile(cache / "tokens.u16", dtype="<u2")
    assert "".join(np.array(list(first.chars))[on_disk[:300]]) == raw_text[:300]

    writes: list[Path] = []
    monkeypatch.setattr(text, "write_atomic", lambda path, content: writes.append(Path(path)))
    again = load_shakespeare("val", data_dir=REAL_ROOT, download=False)
    assert writes == []
    assert isinstance(again.tokens, np.memmap) and np.array_equal(again.tokens, on_disk[N_TRAIN:])


def _truncate_tokens(cache: Path) -> None:
    path = cache / "tokens.u16"
    path.write_bytes(path.read_bytes()[:1000])


def _edit_vocab(**changes):
    def edit(cache: Path) -> None:
        meta = json.loads((cache / "vocab.json").read_text())
        meta.update(changes)
        (cache / "vocab.json").write_text(json.dumps(meta))
    return edit


def _out_of_range_token(cache: Path) -> None:
    path = cache / "tokens.u16"
    tokens = np.fromfile(path, dtype="<u2")
    tokens[123] = 65
    path.write_bytes(tokens.tobytes())


@needs_real
@pytest.mark.parametrize("damage", [
    _truncate_tokens,
    lambda cache: (cache / "tokens.u16").unlink(),
    lambda cache: (cache / "vocab.json").write_text("{not json"),
    lambda cache: (cache / "vocab.json").write_bytes(b"\xff\xfe"),
    lambda cache: (cache / "vocab.json").write_text("[1, 2]"),
    _edit_vocab(format="epx.vocab/0"),
    _edit_vocab(text_sha256="0" * 64),
    _edit_vocab(chars="zyx"),
    _edit_vocab(tokens=N_CHARS - 1),
    _edit_vocab(split=N_TRAIN + 1),
    _out_of_range_token,
], ids=["truncated-tokens", "no-tokens", "bad-json", "not-utf8", "not-object", "format", "sha", "chars",
        "count", "split", "token-range"])
def test_damaged_cache_is_rebuilt(isolated, damage, raw_text):
    good = load_shakespeare(data_dir=REAL_ROOT, download=False)
    cache = _cache(isolated)
    expected_tokens = (cache / "tokens.u16").read_bytes()
    expected_vocab = (cache / "vocab.json").read_text()
    damage(cache)
    ds = load_shakespeare(data_dir=REAL_ROOT, download=False)
    assert ds.chars == good.chars and isinstance(ds.tokens, np.memmap)
    assert ds.decode(ds.tokens[:200]) == raw_text[:200]
    assert (cache / "tokens.u16").read_bytes() == expected_tokens
    assert (cache / "vocab.json").read_text() == expected_vocab


@needs_real
def test_unwritable_cache_falls_back_to_memory(isolated, monkeypatch, raw_text):
    blocker = isolated / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    ds = load_shakespeare(data_dir=REAL_ROOT, download=False)
    assert not isinstance(ds.tokens, np.memmap) and ds.tokens.dtype == np.uint16 and len(ds) == N_TRAIN
    assert not ds.tokens.flags.writeable
    assert ds.decode(ds.tokens[-100:]) == raw_text[N_TRAIN - 100:N_TRAIN]


# ------------------------------------------------------------------------------------------------------------
# Search, checksums, not found
# ------------------------------------------------------------------------------------------------------------


@needs_real
@pytest.mark.parametrize("layout", ["tinyshakespeare/input.txt", "shakespeare_char/input.txt",
                                    "shakespeare/input.txt", "tinyshakespeare.txt"])
def test_layouts(isolated, no_env, layout):
    path = isolated / "root" / layout
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REAL_FILE, path)
    ds = load_shakespeare(data_dir=isolated / "root", download=False)
    assert ds.source == str(path) and len(ds) == N_TRAIN


@needs_real
def test_bare_input_txt_is_not_accepted_and_first_layout_wins(isolated, no_env):
    root = isolated / "root"
    root.mkdir()
    shutil.copyfile(REAL_FILE, root / "input.txt")
    with pytest.raises(DataNotFound):
        load_shakespeare(data_dir=root, download=False)
    (root / "tinyshakespeare.txt").write_text("not Shakespeare")  # later layout, never read
    (root / "tinyshakespeare").mkdir()
    shutil.copyfile(REAL_FILE, root / "tinyshakespeare" / "input.txt")
    assert load_shakespeare(data_dir=root, download=False).source == str(root / "tinyshakespeare" / "input.txt")


@needs_real
def test_data_dir_comes_before_epx_data_dir(isolated, monkeypatch):
    monkeypatch.setenv("EPX_DATA_DIR", str(REAL_ROOT))
    mine = isolated / "mine" / "shakespeare_char" / "input.txt"
    mine.parent.mkdir(parents=True)
    shutil.copyfile(REAL_FILE, mine)
    assert load_shakespeare(data_dir=isolated / "mine", download=False).source == str(mine)
    assert load_shakespeare(download=False).source == str(REAL_FILE)


@needs_real
def test_corrupt_copies_raise_checksum_error(isolated, raw_text):
    root = isolated / "root"
    path = root / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True)
    content = REAL_FILE.read_bytes()

    path.write_bytes(content[:500_000])
    with pytest.raises(ChecksumError) as info:
        load_shakespeare(data_dir=root, download=False)
    msg = str(info.value)
    assert str(path) in msg and SHAKESPEARE_SHA256 in msg and "truncated" in msg
    assert hashlib.sha256(content[:500_000]).hexdigest() in msg and "500000" in msg and str(SHAKESPEARE_SIZE) in msg
    assert "EPX_DATA_DIR" in msg and "--data-dir" in msg

    changed = bytearray(content)
    changed[1000] ^= 0x20
    path.write_bytes(bytes(changed))
    with pytest.raises(ChecksumError) as info:
        load_shakespeare(data_dir=root, download=False)
    msg = str(info.value)
    assert str(path) in msg and SHAKESPEARE_SHA256 in msg and "truncated" not in msg
    # A corrupt file is an error even for "auto", never a reason to fall back to the sample.
    with pytest.raises(ChecksumError):
        _auto(data_dir=root, download=False, warn=pytest.fail)
    assert not _cache(isolated).exists()


def test_not_found_lists_roots_layouts_and_fixes(isolated, no_env):
    with pytest.raises(DataNotFound) as info:
        load_shakespeare(data_dir=isolated / "arg", download=False)
    err = info.value
    assert list(err.searched) == [isolated / "arg", isolated / "xdg" / "epx"]
    msg = str(err)
    for root in err.searched:
        assert f"  - {root}  (does not exist)" in msg
    for layout in ("tinyshakespeare/input.txt", "shakespeare_char/input.txt", "shakespeare/input.txt",
                   "tinyshakespeare.txt"):
        assert f"<root>/{layout}" in msg
    assert msg.startswith("tiny Shakespeare not found") and "Download: disabled" in msg
    for fix in ("EPX_DATA_DIR", "--data-dir", "karpathy/char-rnn", "online",
                str(isolated / "xdg" / "epx" / "tinyshakespeare" / "input.txt")):
        assert fix in msg
    assert "fashion" not in msg.lower()
    assert "\n" not in err.summary and str(isolated / "arg") in err.summary


def test_unknown_split_and_name(no_env):
    with pytest.raises(ValueError, match="train, val, test.*no separate test split"):
        load_shakespeare("validation", download=False)
    with pytest.raises(ValueError, match="train, val, test"):
        make_text_sample("dev")


# ------------------------------------------------------------------------------------------------------------
# Downloads
# ------------------------------------------------------------------------------------------------------------


@needs_real
def test_download_from_file_url_into_cache(isolated, no_env, monkeypatch):
    monkeypatch.setattr(store, "fetch", _real_fetch)
    bad = isolated / "bad-mirror" / "input.txt"
    bad.parent.mkdir()
    bad.write_bytes(REAL_FILE.read_bytes()[:-1])  # one byte short: rejected by the checksum
    urls = (bad.as_uri(), REAL_FILE.as_uri())
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_URLS", urls)
    ds = load_shakespeare("val", download=True)
    assert ds.source == urls[1] and len(ds) == N_VAL
    target = isolated / "xdg" / "epx" / "tinyshakespeare"
    assert [p.name for p in target.iterdir()] == ["input.txt"]
    assert hashlib.sha256((target / "input.txt").read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    # Next time the cached copy is found; nothing is downloaded.
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_URLS", ())
    assert load_shakespeare(download=True).source == str(target / "input.txt")


def test_failed_download_leaves_nothing_and_names_the_cause(isolated, no_env, monkeypatch):
    monkeypatch.setattr(store, "fetch", _real_fetch)
    wrong = isolated / "wrong.txt"
    wrong.write_text("To be, or not to be: that is the question.\n")
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_URLS", (wrong.as_uri(), (isolated / "missing.txt").as_uri()))
    with pytest.raises(DataNotFound) as info:
        load_shakespeare(download=True)
    assert "SHA-256 mismatch" in str(info.value) and "missing.txt" in str(info.value)
    assert "Download: failed" in str(info.value)
    assert list((isolated / "xdg" / "epx" / "tinyshakespeare").iterdir()) == []


# ------------------------------------------------------------------------------------------------------------
# auto and the generated sample
# ------------------------------------------------------------------------------------------------------------


def test_auto_falls_back_with_one_warning(isolated, no_env):
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may go to warnings.warn when warn= is given
        ds = _auto(download=False, warn=seen.append, split="test")
    assert ds.name == "sample" and ds.source == "generated" and ds.split == "val"
    assert np.array_equal(ds.tokens, make_text_sample("val").tokens)
    assert len(seen) == 1
    msg = seen[0]
    assert "\n" not in msg and msg.startswith("warning: tiny Shakespeare not found")
    assert "'sample' text instead" in msg and "EPX_DATA_DIR" in msg and "--data-dir" in msg
    assert str(isolated / "xdg" / "epx") in msg


def test_auto_default_warn_is_warnings_warn(no_env):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _auto(download=False)
    assert ds.name == "sample"
    assert len(caught) == 1 and "sample" in str(caught[0].message)


@needs_real
def test_auto_prefers_shakespeare(monkeypatch):
    monkeypatch.setenv("EPX_DATA_DIR", str(REAL_ROOT))
    assert _auto(download=False, warn=pytest.fail).name == "shakespeare"


def test_sample_is_deterministic_split_and_structured():
    state = torch.get_rng_state()
    train, val = make_text_sample(), make_text_sample("val")
    assert torch.equal(torch.get_rng_state(), state)
    again = make_text_sample()
    assert again.chars == train.chars and np.array_equal(again.tokens, train.tokens)
    assert again.text_sha256 == train.text_sha256 == val.text_sha256
    n = len(train) + len(val)
    assert 100_000 <= n <= 200_000 and len(train) == int(n * 0.9)
    assert train.chars == val.chars and train.name == "sample" and train.source == "generated"
    assert train.tokens.dtype == np.uint16 and not train.tokens.flags.writeable
    whole = train.decode(train.tokens) + val.decode(val.tokens)
    assert hashlib.sha256(whole.encode()).hexdigest() == train.text_sha256
    assert train.describe() == {"name": "sample", "source": "generated", "kind": "text", "split": "train",
                                "tokens": len(train), "vocab_size": train.vocab_size, "sha256": train.text_sha256}
    # The format of tiny Shakespeare: "NAME:" line, verse, blank line; every speech has 1-3 lines.
    speeches = whole.strip("\n").split("\n\n")
    names = {s.split("\n")[0] for s in speeches}
    assert names == {f"{n}:" for n in text._REPLIES}
    assert all(2 <= len(s.split("\n")) <= 4 for s in speeches[:-1])
    # Learnable: the next character given the previous four is far more certain than a uniform guess.
    ctx, joint = Counter(), Counter()
    for i in range(4, 40_000):
        ctx[whole[i - 4:i]] += 1
        joint[whole[i - 4:i + 1]] += 1
    entropy = -sum(c / 39_996 * math.log(c / ctx[k[:4]]) for k, c in joint.items())
    assert entropy < 0.25 * math.log(train.vocab_size)


def test_sample_is_fast():
    make_text_sample()  # warm-up: first torch calls in a process pay one-off costs
    start = time.perf_counter()
    make_text_sample("val")
    assert time.perf_counter() - start < 0.2


def test_sample_batch_on_generator_device():
    ds = make_text_sample()
    x, y = ds.batch(8, context=64, generator=torch.Generator().manual_seed(1))
    assert x.shape == (8, 64) and torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < ds.vocab_size
    assert ds.decode(ds.encode("KING:\nWho loves the fair queen?")) == "KING:\nWho loves the fair queen?"


def test_dataset_validates_its_fields():
    tokens = np.zeros(4, dtype=np.uint16)
    with pytest.raises(ValueError, match="split"):
        TextDataset("x", "generated", "test", "ab", tokens, "0")
    with pytest.raises(ValueError, match="sorted, unique"):
        TextDataset("x", "generated", "train", "ba", tokens, "0")
    with pytest.raises(ValueError, match="uint16"):
        TextDataset("x", "generated", "train", "ab", tokens.astype(np.int64), "0")
    with pytest.raises(ValueError, match="empty"):
        TextDataset("x", "generated", "val", "ab", tokens[:0], "0")


# ------------------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------------------


def test_registered_factories_dispatch_on_kind(isolated, no_env, monkeypatch):
    monkeypatch.setattr(fashionmnist, "SYSTEM_DATA_DIRS", (isolated / "system",))
    registry = load(entry_points=False)
    registered = {name: registry.get("dataset", name).factory for name in registry.names("dataset")}
    assert ImageDataset.kind == "images" and TextDataset.kind == "text"
    assert isinstance(registered["sample"](), ImageDataset)
    sample_text = registered["sample"](kind="text", split="val", shape=(64,))
    assert isinstance(sample_text, TextDataset) and sample_text.split == "val"
    assert np.array_equal(sample_text.tokens, make_text_sample("val").tokens)
    seen: list[str] = []
    auto_text = _auto(download=False, warn=seen.append)
    assert auto_text.name == "sample" and auto_text.kind == "text" and len(seen) == 1
    with pytest.raises(DataNotFound, match="tiny Shakespeare"):
        registered["shakespeare"](kind="images", download=False)
    with pytest.raises(DataNotFound, match="Fashion-MNIST"):
        registered["fashionmnist"](kind="text", download=False)
    with pytest.raises(ConfigError, match="unknown data kind 'audio'; valid kinds: images, text"):
        registered["sample"](kind="audio", download=False)


@needs_real
def test_shakespeare_factory_returns_text(monkeypatch):
    monkeypatch.setenv("EPX_DATA_DIR", str(REAL_ROOT))
    registry = load(entry_points=False)
    registered = {name: registry.get("dataset", name).factory for name in registry.names("dataset")}
    ds = registered["shakespeare"](download=False, split="test", kind="images")
    assert isinstance(ds, TextDataset) and len(ds) == N_VAL
