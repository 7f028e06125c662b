"""One hierarchy for every expected failure. Each class carries the exit code the CLI uses for it, so the CLI
maps an error to an exit status from its class alone:

    EpxError                      1  runtime failure (the base class)
    ├── UsageError                2  the request cannot be carried out as given
    │   ├── ConfigError           2    a value is unknown, malformed or out of range (names the option)
    │   ├── UnknownNameError      2    no estimator/model/dataset/plugin of that name (with did-you-mean)
    │   └── ResumeError           2    a run cannot be resumed with these options (names them)
    ├── DataError                 1  data could not be had
    │   ├── DataNotFound          1    neither found locally nor downloaded
    │   └── ChecksumError         1    a data file is not the published one
    ├── FileFormatError           1  a file epx wrote (or was pointed at) is corrupt, truncated or of the wrong kind
    ├── WriteError                1  a file could not be written (also an OSError)
    ├── DivergenceError           1  a relaxation produced a non-finite state
    ├── PluginError               1  a plugin failed in strict mode
    ├── ThresholdError            3  a requested threshold or check was not met
    └── Interrupted             130  stopped by the user; ``resume`` holds the command that continues, if any

A traceback from epx means a bug in epx, never bad input. This module imports nothing heavy (no torch), so the
command line can report errors before torch is loaded.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import ClassVar

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_THRESHOLD, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def suggest(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean ...?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class EpxError(Exception):
    """An expected failure: the CLI prints its message on one ``error:`` line and exits with ``exit_code``."""

    exit_code: ClassVar[int] = EXIT_RUNTIME


class UsageError(EpxError):
    exit_code: ClassVar[int] = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A configuration value is unknown, malformed or out of range. ``field`` names the offender."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownNameError(UsageError, LookupError):
    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        super().__init__(f"unknown {kind} {name!r}{suggest(name, known)}; available: {', '.join(known) or 'none'}")
        self.kind, self.name = kind, name


class ResumeError(UsageError):
    """A run directory cannot be continued as asked: nothing to resume, or options that differ from it."""


class DataError(EpxError):
    """Data could not be had: missing, unreadable, or not what they claim to be."""


class ChecksumError(DataError, ValueError):
    """A file's SHA-256 does not match the published one."""


class FileFormatError(EpxError, ValueError):
    """A file read back (a sweep's JSON, a run's run.json, log.jsonl or checkpoint.pt, a cache, a data file) is
    corrupt, truncated, of the wrong type or shape. The message names the file and what is wrong with it."""

    def __init__(self, path: object, problem: str, remedy: str = ""):
        super().__init__(f"{path}: {problem}" + (f"; {remedy}" if remedy else ""))
        self.path, self.problem = path, problem


class WriteError(EpxError, OSError):
    """A file could not be written (no space, no permission, a directory that cannot be created). An OSError too,
    so that callers for whom writing is optional (a cache) can go on without it."""


class DivergenceError(EpxError):
    """A relaxation produced a non-finite state."""

    def __init__(self, phase: str, step: int, eps: float, remedy: str):
        super().__init__(
            f"the {phase} relaxation diverged at step {step} (state became non-finite) with step size "
            f"eps={eps:g}; {remedy}"
        )
        self.phase, self.step, self.eps = phase, step, eps


class DistributedError(EpxError):
    """A process of a torch.distributed job could not start, or lost the others: a rank stopped (its own message
    says why), the network failed, or a collective waited longer than the timeout."""


class PluginError(EpxError):
    """Raised in strict mode when a plugin fails."""


class ThresholdError(EpxError):
    """A threshold the user asked for (``--min-cosine``) or a check (``epx check``) was not met."""

    exit_code: ClassVar[int] = EXIT_THRESHOLD


class Interrupted(EpxError):
    """Stopped by the user (Ctrl-C). ``resume`` is the command line that continues the work, when it can be."""

    exit_code: ClassVar[int] = EXIT_INTERRUPTED

    def __init__(self, what: str, resume: str | None = None):
        super().__init__(f"interrupted {what}" + (f"; to continue, run: {resume}" if resume else ""))
        self.resume = resume
