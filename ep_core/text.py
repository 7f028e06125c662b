"""Character-level text datasets for epx: tiny Shakespeare from a local file or the network, and a generated
``sample`` play.

Where tiny Shakespeare is looked for
------------------------------------
The roots are those of :func:`ep_core.data.search_path`, in order: the ``data_dir`` argument (the CLI's
``--data-dir``), ``$EPX_DATA_DIR``, then the user cache (``$XDG_CACHE_HOME/epx`` or ``~/.cache/epx``). No
system directory is searched: no distribution packages the file. Inside each root the first of these wins:
``tinyshakespeare/input.txt`` (ours, and where downloads land), ``shakespeare_char/input.txt`` (nanoGPT's
layout), ``shakespeare/input.txt``, ``tinyshakespeare.txt``. A bare ``input.txt`` is not accepted: the name is
too generic to mean this text.

The file found is checked against the published SHA-256 on every load (1 MB: about 2 ms). A mismatch raises
:class:`~ep_core.data.ChecksumError` and never falls back to the sample: the user pointed at this file, so
training on something else would hide the problem. If no root holds the file and downloading is allowed, it is
fetched from :data:`SHAKESPEARE_URLS` into ``<user cache>/tinyshakespeare/input.txt``, verified, and moved into
place atomically; that path is a search location, so the next run finds it there.

Tokens and their cache
----------------------
The vocabulary is the sorted set of characters of the whole text, so both splits share it; token ids are
uint16. Tokenising is cached per text in ``<user cache>/text/<first 16 hex digits of the text's SHA-256>/``:
``tokens.u16`` holds the ids of the whole text as raw little-endian uint16 and ``vocab.json`` the vocabulary
with the facts needed to check the pair (format tag, full SHA-256, token count, split boundary). Tokens are
then memory-mapped read-only. A cache that fails any check is rebuilt, since only we write it; a cache that
cannot be written (read-only home) just means in-memory tokens. Nothing is ever pickled.

Splits
------
The first 90% of the tokens are "train", the rest "val", as in nanoGPT. Tiny Shakespeare has no separate test
split, so "test" is accepted as another name for "val".

``auto`` tries tiny Shakespeare (download included, if allowed) and, when it is unreachable, warns once and
falls back to :func:`make_text_sample`, a generated play that needs no files or network.
"""

from __future__ import annotations

import hashlib
import json
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ep_core.data import (
    ChecksumError,
    DataNotFound,
    DownloadError,
    _fetch,
    _one_line,
    real_or_sample,
    search_path,
    user_cache_dir,
)
from ep_core.files import write_atomic

__all__ = [
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_SIZE",
    "SHAKESPEARE_URLS",
    "TEXT_DATASET_NAMES",
    "TextDataset",
    "load_shakespeare",
    "make_text_sample",
    "resolve_text",
]

# ------------------------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------------------------

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

TEXT_DATASET_NAMES: tuple[str, ...] = ("auto", "sample", "shakespeare")

# Requested split -> stored split. "test" maps to "val": tiny Shakespeare has no third part.
_SPLITS = {"train": "train", "val": "val", "test": "val"}

_VOCAB_FORMAT = "epx.vocab/1"
_MAX_VOCAB = 1 << 16  # token ids are uint16


# ------------------------------------------------------------------------------------------------------------
# The dataset object
# ------------------------------------------------------------------------------------------------------------


def _positive_int(what: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{what} must be >= 1, got {number}")
    return number


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


# eq=False: dataclass equality would compare token arrays element-wise; identity is what callers want.
@dataclass(frozen=True, eq=False)
class TextDataset:
    """One split of a character-level text.

    ``chars`` is the vocabulary (sorted unique characters of the whole text, shared by both splits), token
    ``i`` stands for ``chars[i]``. ``tokens`` is a 1-D uint16 array of this split's ids, memory-mapped for real
    data. ``source`` is the file read, the URL downloaded from, or ``"generated"``; ``text_sha256`` identifies
    the whole text.
    """

    kind: ClassVar[str] = "text"

    name: str
    source: str
    split: str
    chars: str = field(repr=False)
    tokens: np.ndarray = field(repr=False)
    text_sha256: str

    def __post_init__(self) -> None:
        if self.split not in ("train", "val"):
            raise ValueError(f"{self.name}: split must be 'train' or 'val', got {self.split!r}")
        if not self.chars or "".join(sorted(set(self.chars))) != self.chars:
            raise ValueError(f"{self.name}: chars must be a non-empty string of sorted, unique characters")
        tok = self.tokens
        if not isinstance(tok, np.ndarray) or tok.dtype.kind != "u" or tok.dtype.itemsize != 2 or tok.ndim != 1:
            raise ValueError(f"{self.name}: tokens must be a 1-D uint16 array, got "
                             f"{getattr(tok, 'dtype', type(tok).__name__)} with shape {getattr(tok, 'shape', '?')}")
        if tok.size < 1:
            raise ValueError(f"{self.name}: the {self.split} split is empty")

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def batch(
        self,
        size: int,
        *,
        context: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` random windows of ``context`` characters: int64 inputs and targets, both (size, context).

        ``targets[:, t]`` is the character after ``inputs[:, t]``. Window starts are drawn with replacement by
        ``torch.randint`` from ``generator`` alone, so the same generator state gives the same batch.
        """
        size = _positive_int("batch size", size)
        context = _positive_int("context", context)
        n = len(self)
        if context + 1 > n:
            raise ValueError(f"context {context} needs {context + 1} tokens (the inputs and one more character to "
                             f"predict), but the {self.split} split of {self.name!r} has only {n}")
        # randint must run where the generator lives; the offsets then index the host-side tokens.
        starts = torch.randint(0, n - context, (size,), generator=generator, device=generator.device)
        index = starts.cpu().numpy()[:, None] + np.arange(context + 1)
        windows = torch.from_numpy(np.asarray(self.tokens[index], dtype=np.int64)).to(device)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def encode(self, text: str) -> torch.Tensor:
        """The int64 token ids of ``text``; ValueError naming the first character outside the vocabulary."""
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        vocab = _code_points(self.chars)
        codes = _code_points(text)
        ids = np.minimum(np.searchsorted(vocab, codes), len(vocab) - 1)
        known = vocab[ids] == codes
        if not known.all():
            bad = text[int(np.argmin(known))]
            raise ValueError(f"character {bad!r} (U+{ord(bad):04X}) is not in the {self.vocab_size}-character "
                             f"vocabulary of {self.name!r}")
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> str:
        """The text of a 1-D sequence of token ids; ValueError for ids outside ``0..vocab_size-1``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
        if arr.size == 0:
            return ""
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"decode needs a 1-D sequence of integer ids, got {arr.dtype} with shape {arr.shape}")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range for the {self.vocab_size}-character "
                             f"vocabulary of {self.name!r} (valid: 0..{self.vocab_size - 1})")
        return "".join(np.array(list(self.chars))[arr].tolist())

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the data actually used, for results."""
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "split": self.split,
            "tokens": len(self),
            "vocab_size": self.vocab_size,
            "sha256": self.text_sha256,
        }


def _split_name(split: object) -> str:
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(f"unknown text split {split!r}; valid: train, val, test (tiny Shakespeare has no "
                         "separate test split, so test is the same as val)")
    return _SPLITS[split]


def _train_size(n: int) -> int:
    return int(n * 0.9)  # nanoGPT's rule, so numbers compare with its char-level runs


def _dataset(name: str, source: str, split: str, chars: str, tokens: np.ndarray, sha: str) -> TextDataset:
    """The ``split`` part of a whole text's ``tokens``."""
    boundary = _train_size(len(tokens))
    part = tokens[:boundary] if split == "train" else tokens[boundary:]
    return TextDataset(name=name, source=source, split=split, chars=chars, tokens=part, text_sha256=sha)


# ------------------------------------------------------------------------------------------------------------
# Tokenising, and the cache of tokens
# ------------------------------------------------------------------------------------------------------------


def _tokenise(text: str) -> tuple[str, np.ndarray]:
    """(vocabulary, read-only uint16 ids) of a whole text."""
    if not text:
        raise ValueError("cannot tokenise an empty text")
    codes = _code_points(text)
    # A lookup table over code points: no sort, so ~10x faster than np.unique on a megabyte of text.
    present = np.flatnonzero(np.bincount(codes))
    if present.size > _MAX_VOCAB:
        raise ValueError(f"text has {present.size} distinct characters; uint16 token ids allow {_MAX_VOCAB}")
    table = np.zeros(int(present[-1]) + 1, dtype="<u2")
    table[present] = np.arange(present.size)
    tokens = table[codes]
    tokens.flags.writeable = False  # the same contract as the read-only memmap of a cached text
    return "".join(map(chr, present.tolist())), tokens


def _cache_dir(sha: str) -> Path:
    return user_cache_dir() / "text" / sha[:16]


def _load_cached(directory: Path, sha: str) -> tuple[str, np.ndarray] | None:
    """(vocabulary, memory-mapped ids) from a cache that passes every check, else None."""
    try:
        meta = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return None
    if not isinstance(meta, dict) or meta.get("format") != _VOCAB_FORMAT or meta.get("text_sha256") != sha:
        return None
    chars, count = meta.get("chars"), meta.get("tokens")
    if not isinstance(chars, str) or not chars or "".join(sorted(set(chars))) != chars:
        return None
    if type(count) is not int or count < 1 or meta.get("split") != _train_size(count):
        return None
    path = directory / "tokens.u16"
    try:
        if path.stat().st_size != 2 * count:
            return None
        tokens = np.memmap(path, dtype="<u2", mode="r")
    except (OSError, ValueError):
        return None
    # Ids past the vocabulary would surface much later as an index error inside a model; 1 ms to rule out.
    if int(tokens.max()) >= len(chars):
        return None
    return chars, tokens


def _cached_tokens(raw: bytes, sha: str) -> tuple[str, np.ndarray]:
    """(vocabulary, ids) of the UTF-8 text ``raw`` whose SHA-256 is ``sha``, through the cache."""
    directory = _cache_dir(sha)
    cached = _load_cached(directory, sha)
    if cached is not None:
        return cached
    chars, tokens = _tokenise(raw.decode("utf-8"))
    meta = {
        "format": _VOCAB_FORMAT,
        "chars": chars,
        "text_sha256": sha,
        "tokens": int(tokens.size),
        "split": _train_size(int(tokens.size)),
    }
    try:
        # Tokens first: a vocab.json that exists always describes a complete tokens.u16.
        write_atomic(directory / "tokens.u16", tokens.astype("<u2").tobytes())
        write_atomic(directory / "vocab.json", json.dumps(meta, ensure_ascii=True) + "\n")
    except OSError:
        return chars, tokens  # cache not writable: the in-memory ids serve the same, only rebuilt next time
    return chars, np.memmap(directory / "tokens.u16", dtype="<u2", mode="r")


# ------------------------------------------------------------------------------------------------------------
# Tiny Shakespeare
# ------------------------------------------------------------------------------------------------------------


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
    attempts: list[str] = []
    # As for Fashion-MNIST: ``timeout`` bounds each socket operation and the time spent on failing mirrors.
    deadline = time.monotonic() + timeout
    for url in SHAKESPEARE_URLS:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            attempts.append(f"gave up after {timeout:.1f} s")
            break
        try:
            _fetch(url, dest, sha256=SHAKESPEARE_SHA256, max_bytes=SHAKESPEARE_SIZE,
                   timeout=min(timeout, remaining))
            return dest, url
        except (OSError, ChecksumError) as e:  # URLError and socket timeouts are OSErrors
            attempts.append(f"{url}: {_one_line(str(e)) or type(e).__name__}")
    raise DownloadError(attempts)


def _not_found(searched: Sequence[Path], download: str) -> DataNotFound:
    cache = user_cache_dir() / _SHAKESPEARE_LAYOUTS[0]
    return DataNotFound(
        "tiny Shakespeare",
        ("input.txt",),
        searched,
        download,
        layouts=_SHAKESPEARE_LAYOUTS,
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
    split = _split_name(split)
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
    chars, tokens = _cached_tokens(raw, SHAKESPEARE_SHA256)
    return _dataset("shakespeare", source or str(path), split, chars, tokens, SHAKESPEARE_SHA256)


# ------------------------------------------------------------------------------------------------------------
# The generated sample text
# ------------------------------------------------------------------------------------------------------------

_SAMPLE_SEED = 0
_SAMPLE_LENGTH = 150_000  # characters, reached at the end of the speech that crosses it

# Who answers whom: each speaker has two habitual partners, so the name after a blank line is predictable from
# the one before.
_REPLIES: dict[str, tuple[str, str]] = {
    "KING": ("QUEEN", "DUKE"),
    "QUEEN": ("KING", "NURSE"),
    "PRINCE": ("GHOST", "LADY"),
    "DUKE": ("KING", "FOOL"),
    "LADY": ("PRINCE", "NURSE"),
    "NURSE": ("LADY", "QUEEN"),
    "FOOL": ("DUKE", "PRINCE"),
    "GHOST": ("PRINCE", "FOOL"),
}
_DETERMINERS = ("the", "my", "thy", "our", "this", "that")
_ADJECTIVES = ("good", "fair", "noble", "sweet", "cruel", "gentle", "old", "dark", "proud", "true")
_NOUNS = ("lord", "king", "queen", "night", "heart", "crown", "sword", "love", "day", "grave", "blood", "land")
_VERBS = ("loves", "fears", "seeks", "takes", "keeps", "hates", "calls", "serves", "knows", "betrays")
_PREPOSITIONS = ("of", "in", "upon", "for", "with", "against")
_EXCLAMATIONS = ("O", "Alas", "Nay", "Hark")


def _draws(g: torch.Generator) -> Iterator[int]:
    # In blocks: one torch call per 4096 numbers instead of one each.
    while True:
        yield from torch.randint(0, 1 << 30, (4096,), generator=g).tolist()


def _sample_text() -> str:
    """A play in tiny Shakespeare's format ("NAME:" line, verse lines, blank line) from a small grammar.

    Sentence: [exclamation ","] noun phrase, verb, noun phrase, [preposition, noun phrase]; a noun phrase is
    determiner [adjective] noun. Punctuation follows the words: "!" after an exclamation, "?" after "who"
    (which replaces the first noun phrase), "." otherwise.
    """
    r = _draws(torch.Generator().manual_seed(_SAMPLE_SEED))

    def pick(options: Sequence[str]) -> str:
        return options[next(r) % len(options)]

    def noun_phrase() -> str:
        adjective = pick(_ADJECTIVES) + " " if next(r) % 2 else ""
        return f"{pick(_DETERMINERS)} {adjective}{pick(_NOUNS)}"

    def sentence() -> str:
        roll = next(r) % 6
        subject = "who" if roll == 0 else noun_phrase()
        words = f"{subject} {pick(_VERBS)} {noun_phrase()}"
        if next(r) % 3 == 0:
            words += f" {pick(_PREPOSITIONS)} {noun_phrase()}"
        if roll == 1:
            return f"{pick(_EXCLAMATIONS)}, {words}!"
        return words[0].upper() + words[1:] + ("?" if roll == 0 else ".")

    speeches: list[str] = []
    length = 0
    speaker = "KING"
    while length < _SAMPLE_LENGTH:
        lines = [sentence() for _ in range(1 + next(r) % 3)]
        speech = f"{speaker}:\n" + "\n".join(lines) + "\n\n"
        speeches.append(speech)
        length += len(speech)
        speaker = pick(_REPLIES[speaker])
    return "".join(speeches)


def make_text_sample(split: str = "train") -> TextDataset:
    """A generated play of about 150,000 characters: deterministic, offline, split 90/10 like tiny Shakespeare.

    Speaker names in capitals and a small grammar over a few dozen words give it structure at every scale a
    character model can learn, so its loss falls far below ln(vocab_size). Randomness comes from a seeded
    torch.Generator; the global RNG is never touched.
    """
    split = _split_name(split)
    text = _sample_text()
    raw = text.encode("utf-8")
    chars, tokens = _tokenise(text)
    return _dataset("sample", "generated", split, chars, tokens, hashlib.sha256(raw).hexdigest())


# ------------------------------------------------------------------------------------------------------------
# Choosing a text by name
# ------------------------------------------------------------------------------------------------------------


def resolve_text(
    name: str = "auto",
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
    warn: Callable[[str], Any] | None = None,
    split: str = "train",
) -> TextDataset:
    """The text dataset called ``name``: "shakespeare", "sample", or "auto".

    "auto" tries tiny Shakespeare (download included, if allowed) and on DataNotFound calls ``warn`` once with
    a one-line message (``warnings.warn`` when ``warn`` is None) and returns the generated sample. A corrupt
    file is an error, not a reason to fall back.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in TEXT_DATASET_NAMES:
        raise ValueError(f"unknown text dataset {name!r}; valid names: {', '.join(TEXT_DATASET_NAMES)}")
    split = _split_name(split)
    if key == "shakespeare":
        return load_shakespeare(split, data_dir=data_dir, download=download)
    if key == "sample":
        return make_text_sample(split)
    return real_or_sample(lambda: load_shakespeare(split, data_dir=data_dir, download=download),
                          lambda: make_text_sample(split), what="text", warn=warn)
