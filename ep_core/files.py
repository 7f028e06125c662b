"""Files: atomic writes (a reader, or a rerun after a kill, sees the old file or the new one, never half of one),
output paths checked before any work starts, and JSON read back with a clear error for a bad file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ep_core.errors import ConfigError, FileFormatError, WriteError


def write_atomic(path: str | os.PathLike[str], content: str | bytes) -> None:
    """Write ``content`` to a temporary file beside ``path``, fsync it, then rename it over ``path``. A failure
    (no space, no permission, a parent that cannot be created) is a WriteError naming the file; the old file, if
    any, is left as it was."""
    path = Path(path)
    try:
        _write_atomic(path, content)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}"
                         + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else "")) from exc


def _write_atomic(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates the file 0600; give the result the permissions an ordinary open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(path: str | os.PathLike[str], *, option: str, directory: bool = False) -> list[Path]:
    """Fail now, before hours of work, if ``path`` could not be written later; return the parent directories
    that writing will create (outermost first), so that the caller can report them. Nothing is created here.

    ``directory``: ``path`` is a directory to write files into (it may exist); else a file, which must not be a
    directory. A ConfigError naming ``option`` says what is wrong.
    """
    path = Path(path)
    if str(path) in ("", "."):
        raise ConfigError(option, "needs a path")
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(option, f"{path} exists and is not a directory")
    if not directory and path.is_dir():
        raise ConfigError(option, f"{path} is a directory; give a file name")
    existing = path if directory and path.is_dir() else path.parent
    missing: list[Path] = []
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(option, f"{existing} is a broken symbolic link")
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(option, f"cannot write {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(option, f"cannot write {path}: no permission to write in {existing}")
    if not directory and path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(option, f"cannot write {path}: the file is read-only")
    return missing[::-1]


def read_json(path: str | os.PathLike[str], *, what: str, remedy: str = "") -> Any:
    """The JSON value in ``path``; a FileFormatError naming the file and ``what`` it should be when it cannot be
    read, is not UTF-8, or is not (complete) JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(path, f"not {what}: not UTF-8 text", remedy) from None
    except OSError as exc:
        raise FileFormatError(path, f"cannot be read ({exc.strerror or exc})", remedy) from None
    if not text.strip():
        raise FileFormatError(path, f"not {what}: the file is empty", remedy)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # JSON strings hold no raw newlines, so an unterminated one can only be cut off by the end of the file.
        truncated = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        cut = " (the file looks truncated)" if truncated else ""
        raise FileFormatError(path, f"not {what}: invalid JSON at line {exc.lineno} column {exc.colno}: "
                                    f"{exc.msg}{cut}", remedy) from None


def require(path: str | os.PathLike[str], condition: bool, problem: str, remedy: str = "") -> None:
    """A FileFormatError for ``path`` unless ``condition``: for the checks of a file's structure."""
    if not condition:
        raise FileFormatError(path, problem, remedy)
