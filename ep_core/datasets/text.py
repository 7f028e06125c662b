"""Character-level text data: the :class:`TextDataset` every text dataset returns, the cache of token ids, and
the generated ``sample`` play.

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
The first 90% of the tokens are "train", the rest "val", as in nanoGPT. A text without a separate test split
accepts "test" as another name for "val".

The generated play (:func:`make_text_sample`) needs no files or network; it is what ``auto`` falls back to for a
text model when none of the model's real texts can be had.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ep_core.datasets.store import positive_int, user_cache_dir
from ep_core.files import write_atomic

__all__ = ["TextDataset", "cached_tokens", "make_text_sample", "split_dataset", "text_split"]

# Requested split -> stored split. "test" maps to "val": tiny Shakespeare has no third part.
_SPLITS = {"train": "train", "val": "val", "test": "val"}

_VOCAB_FORMAT = "epx.vocab/1"
_MAX_VOCAB = 1 << 16  # token ids are uint16


# ------------------------------------------------------------------------------------------------------------
# The dataset object
# ------------------------------------------------------------------------------------------------------------


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
        size = positive_int("batch size", size)
        context = positive_int("context", context)
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


def text_split(split: object) -> str:
    """The stored split ("train" or "val") a requested ``split`` names."""
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(f"unknown text split {split!r}; valid: train, val, test (tiny Shakespeare has no "
                         "separate test split, so test is the same as val)")
    return _SPLITS[split]


def _train_size(n: int) -> int:
    return int(n * 0.9)  # nanoGPT's rule, so numbers compare with its char-level runs


def split_dataset(name: str, source: str, split: str, chars: str, tokens: np.ndarray, sha: str) -> TextDataset:
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


def cached_tokens(raw: bytes, sha: str) -> tuple[str, np.ndarray]:
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
    split = text_split(split)
    text = _sample_text()
    raw = text.encode("utf-8")
    chars, tokens = _tokenise(text)
    return split_dataset("sample", "generated", split, chars, tokens, hashlib.sha256(raw).hexdigest())
