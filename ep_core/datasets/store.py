"""What every dataset module shares: where files are looked for, where downloads go, how they are fetched and
verified, what "not found" says, and the fallback from real data to the generated sample.

Where datasets are looked for
-----------------------------
:func:`search_path` gives the roots, first match wins:

1. the ``data_dir`` argument (the CLI's ``--data-dir``);
2. ``$EPX_DATA_DIR``;
3. the user cache, ``$XDG_CACHE_HOME/epx`` or ``~/.cache/epx`` (:func:`user_cache_dir`; downloads land there);
4. the dataset's own system locations, if it has any (Fashion-MNIST: Debian's ``/usr/share/datasets/...``).

Roots are absolute and normalised. Each dataset module decides which layouts inside a root it accepts.

Downloads
---------
:func:`download` tries a dataset's URLs in order within one time budget; :func:`fetch` streams one URL into a
temporary file beside the destination, stops at a size cap (a captive portal or a wrong URL is not read to the
end), checks SHA-256 and only then renames the file into place, so a partial or wrong download is never found
later. Nothing downloaded is ever unpickled.

This module imports no torch and no numpy.
"""

from __future__ import annotations

import hashlib
import operator
import os
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ep_core.errors import ChecksumError, DataError

__all__ = ["DataNotFound", "DownloadError", "download", "fetch", "one_line", "real_or_sample", "search_path",
           "user_cache_dir"]

_USER_AGENT = "epx (dataset download)"



def as_int(what: str, value: object) -> int:
    """``value`` as an int; a TypeError naming ``what`` for anything else, bools included."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None


def positive_int(what: str, value: object) -> int:
    """``value`` as an int >= 1 (see :func:`as_int`); a ValueError below 1."""
    number = as_int(what, value)
    if number < 1:
        raise ValueError(f"{what} must be >= 1, got {number}")
    return number

def one_line(text: str) -> str:
    return " ".join(str(text).split())


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


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


class DataNotFound(DataError):
    """A real dataset could not be found locally nor downloaded.

    ``missing`` says what no root held (files, layouts), ``searched`` lists the roots tried, ``download`` what
    happened to the download; ``fixes`` are the dataset's own remedies, listed after the common ones
    (EPX_DATA_DIR, --data-dir).
    """

    def __init__(self, dataset: str, searched: Sequence[Path], download: str, *, missing: str,
                 fixes: Sequence[str]) -> None:
        self.dataset = dataset
        self.searched = tuple(searched)
        self.download = one_line(download)
        lines = [f"{dataset} not found: {missing}. Searched, in order:"]
        for root in self.searched:
            note = "" if root.is_dir() else "  (does not exist)"
            lines.append(f"  - {root}{note}")
        lines.append(f"Download: {self.download}")
        lines.append("To fix, do one of:")
        lines.append("  - set EPX_DATA_DIR to a directory holding the files (e.g. ../shared/data)")
        lines.append("  - pass --data-dir DIR (or data_dir=DIR)")
        lines.extend(f"  - {fix}" for fix in fixes)
        super().__init__("\n".join(lines))

    @property
    def summary(self) -> str:
        """One line: what was missing, where we looked, and what the download did."""
        where = ", ".join(str(p) for p in self.searched)
        return f"{self.dataset} not found (searched: {where}; download: {self.download})"


class DownloadError(OSError):
    """Every URL failed for some file; ``attempts`` holds one line per (url, error)."""

    def __init__(self, attempts: Sequence[str]) -> None:
        self.attempts = tuple(attempts)
        super().__init__("; ".join(self.attempts) if self.attempts else "no download attempted")


# ------------------------------------------------------------------------------------------------------------
# Downloading
# ------------------------------------------------------------------------------------------------------------


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


def fetch(url: str, dest: Path, *, sha256: str, max_bytes: int, timeout: float) -> None:
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


def download(urls: Sequence[str], dest: Path, *, sha256: str, max_bytes: int, timeout: float) -> str:
    """Fetch the first of ``urls`` that works into ``dest`` (verified, atomically); the URL it came from.

    ``timeout`` bounds each socket operation and also the time spent on failing URLs, so an offline machine
    gives up in about ``timeout`` seconds; a download that is making progress is never cut short. Raises
    DownloadError with one line per failed attempt.
    """
    attempts: list[str] = []
    deadline = time.monotonic() + timeout
    for url in urls:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            attempts.append(f"{dest.name}: gave up after {timeout:.1f} s")
            break
        try:
            fetch(url, dest, sha256=sha256, max_bytes=max_bytes, timeout=min(timeout, remaining))
            return url
        except (OSError, ChecksumError) as e:  # URLError and socket timeouts are OSErrors
            attempts.append(f"{url}: {one_line(str(e)) or type(e).__name__}")
    raise DownloadError(attempts)


# ------------------------------------------------------------------------------------------------------------
# Real data, or the generated sample
# ------------------------------------------------------------------------------------------------------------


def real_or_sample(loaders: Sequence[Callable[[], Any]], make_sample: Callable[[], Any], *, what: str,
                   warn: Callable[[str], Any] | None) -> Any:
    """The first of ``loaders`` whose data can be had; when every one raises DataNotFound, ONE warning that
    names each dataset and where it was looked for (through ``warn``, else ``warnings.warn``), then
    ``make_sample()``. Only DataNotFound moves on: a corrupt or mismatching file is an error, since silently
    using other data when the user pointed at real data would hide the problem."""
    missing: list[str] = []
    for load in loaders:
        try:
            return load()
        except DataNotFound as e:
            missing.append(e.summary)
    reasons = "; ".join(missing) or "no real dataset to try"
    msg = one_line(f"warning: {reasons}; using the generated 'sample' {what} instead — "
                   "set EPX_DATA_DIR or pass --data-dir for real data")
    if warn is None:
        warnings.warn(msg, UserWarning, stacklevel=3)
    else:
        warn(msg)
    return make_sample()
