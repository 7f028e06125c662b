"""The `epx` command line. Results go to stdout (a rich table, or JSON); progress, warnings and errors to stderr.

Exit codes: 0 ok · 1 runtime failure (divergence, missing data) · 2 usage error (unknown name, bad option)
· 3 a requested threshold was not met.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ep_core.errors import (EXIT_OK, EXIT_RUNTIME, ConfigError, EpxError, Interrupted, ThresholdError,
                            UnknownNameError, UsageError)
from ep_core.files import check_output, write_atomic
from ep_core.seeding import SEED_MAX
from ep_core.plugins import Registry, load
from epx_cli.render import SEEDS_FORMAT, StdoutConsole, comparison_notes, comparison_report, seeds_report

PER_PARAMETER_AUTO = 6

out = StdoutConsole()
err = Console(stderr=True, soft_wrap=True)


@functools.cache
def registry() -> Registry:
    return load()


INVOCATION = "epx.invocation"


def invocation() -> str:
    """The command line being run, quoted for a shell: what to run again to resume a resumable command."""
    import shlex

    return shlex.join(click.get_current_context().meta.get(INVOCATION, ["epx"]))


def command_path(ctx: click.Context) -> str:
    """``epx analyze fixed-point``: the command as typed, whatever name the program was started under."""
    names = []
    while ctx is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["epx", *reversed(names[:-1])])


RANK_LABEL = ""
"""Under torchrun, "rank N: " on every rank but 0, whose errors are the only lines it prints."""


def fail(message: str, code: int) -> None:
    err.quiet = False
    err.print(f"[bold red]error:[/] {escape(RANK_LABEL + message)}", highlight=False)
    sys.exit(code)


def report(exc: EpxError) -> None:
    """Print an expected failure on one line and exit with the code its class carries."""
    if isinstance(exc, Interrupted):
        err.print(f"[bold yellow]interrupted:[/] {escape(str(exc).removeprefix('interrupted '))}", highlight=False)
        sys.exit(exc.exit_code)
    fail(str(exc), exc.exit_code)


class HandledGroup(click.Group):
    """A command group that reports every expected failure the same way, whichever command (a plugin's too) it
    comes from: one ``error:`` line and the exit code of the error's class (ep_core.errors); click's own usage
    errors as one line with a pointer to --help (exit 2); Ctrl-C as one ``interrupted:`` line (exit 130).
    Anything else is a bug in epx and keeps its traceback."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        raw = [info_name or "epx", *args]
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta.setdefault(INVOCATION, raw)
        return ctx

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = f" (see `{command_path(exc.ctx)} --help`)" if exc.ctx is not None else ""
            fail(exc.format_message() + where, exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            report(Interrupted("by the user (Ctrl-C); nothing was kept"))
        except EpxError as exc:
            report(exc)
        except BrokenPipeError:
            # The reader went away (`epx list | head`): stop quietly, without a second error at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_RUNTIME)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else EXIT_OK)


class EpxGroup(HandledGroup):
    """Adds plugins' commands on first use, so `epx` works even if a plugin's commands fail."""

    def _plugin_commands(self) -> None:
        if not getattr(self, "_loaded", False):
            self._loaded = True
            registry().add_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._plugin_commands()
        return super().get_command(ctx, name)


@click.group(cls=EpxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="epx")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, envvar="EPX_THREADS",
              help="CPU threads for torch. Relaxations are long chains of small tensor operations: one thread is "
                   "usually fastest, and several threads slow down badly when the machine is busy.")
@click.pass_context
def cli(ctx: click.Context, threads: int) -> None:
    """epx: gradient estimators that avoid or approximate backpropagation, measured against the exact gradient.

    \b
    epx compare aep bptt --model cet      how close is AEP to the true gradient on cet?
    epx list                              what is installed
    epx info aep                          an estimator's options and exact limit
    epx plugins                           which plugins loaded, and which failed
    """
    follow_launcher(ctx.invoked_subcommand)


JOB_COMMANDS = ("sweep", "train")
"""The commands that run as one job of several processes under torchrun (ep_core.distributed)."""


def follow_launcher(command: str | None) -> None:
    """Under torchrun (WORLD_SIZE > 1): refuse a command that runs in one process, and keep every rank but 0
    silent from the start, but for its own errors, which name their rank."""
    global RANK_LABEL
    size = os.environ.get("WORLD_SIZE", "1").strip()
    if not size.isdigit() or int(size) <= 1 or command is None:
        return
    rank = os.environ.get("RANK", "0").strip()
    if rank != "0":
        out.quiet = err.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — for the rest of the process: click.echo writes there too
        RANK_LABEL = f"rank {rank}: "
    if command not in JOB_COMMANDS:
        raise UsageError(f"`epx {command}` runs in one process: start it without torchrun (under torchrun, "
                         f"{' and '.join(JOB_COMMANDS)} share their work among the processes)")


def use_torch() -> None:
    """Load torch and give it the thread count of --threads. Commands that compute call this first; those that
    only list or explain (--help, list, plugins) never load torch, so they start at once."""
    import torch

    context = click.get_current_context(silent=True)
    torch.set_num_threads(context.find_root().params.get("threads", 1) if context is not None else 1)


KIND_OPTIONS = {"estimators": "estimator", "models": "model", "datasets": "dataset"}


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(sorted(KIND_OPTIONS)))
def list_command(kind: str | None) -> None:
    """List registered estimators, models and datasets."""
    reg = registry()
    for plural in [kind] if kind else list(KIND_OPTIONS):
        table = Table(title=plural, title_justify="left", header_style="bold")
        table.add_column("name")
        table.add_column("plugin")
        table.add_column("summary")
        for name in reg.names(KIND_OPTIONS[plural]):
            entry = reg.get(KIND_OPTIONS[plural], name)
            table.add_row(name, entry.plugin, entry.summary)
        out.print(table)
    if reg.failures:
        err.print(f"[yellow]warning:[/] {len(reg.failures)} plugin(s) failed to load; see `epx plugins`")


@cli.command()
@click.argument("name")
@click.pass_context
def info(ctx: click.Context, name: str) -> None:
    """Show what NAME (an estimator, model or dataset) is: summary, exact limit, options and their ranges."""
    reg = registry()
    matches = [reg.entries[k][name] for k in ("estimator", "model", "dataset") if name in reg.entries[k]]
    if not matches:
        if name in cli.list_commands(ctx):
            raise ConfigError("NAME", f"{name!r} is a command, not an estimator, model or dataset: see "
                                      f"`epx {name} --help`")
        every = [n for k in ("estimator", "model", "dataset") for n in reg.names(k)]
        raise UnknownNameError("estimator, model or dataset", name, every)
    for entry in matches:
        factory = entry.factory
        out.print(f"[bold]{entry.name}[/] ({entry.kind}, from plugin {entry.plugin}): {entry.summary}")
        if getattr(factory, "exact_limit", None):
            out.print(f"exact limit: {factory.exact_limit}")
        if entry.kind == "estimator":
            from ep_core.protocols import StatefulEstimator

            if isinstance(factory, StatefulEstimator):
                out.print("state: kept between estimates; built by init(model, generator) from the seed's own "
                          "stream, saved in epx train's checkpoints and restored on --resume")
        config = getattr(factory, "Config", None)
        if config is not None:
            rows = config.describe()
            if rows:
                table = Table(header_style="bold")
                for column in ("option", "type", "default", "valid", "help"):
                    table.add_column(column)
                for row in rows:
                    table.add_row(row["name"], row["type"], str(row["default"]), row["range"], row["help"])
                out.print(table)
            else:
                out.print("no options")
        doc = (getattr(factory, "__module__", None) and sys.modules[factory.__module__].__doc__) or ""
        if doc and entry.kind == "estimator":
            out.print(doc.strip(), highlight=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--load", "load_all", is_flag=True,
              help="Also import everything each plugin registered by reference (which loads torch), so that one "
                   "that cannot be imported shows as failed now rather than when it is first used.")
def plugins(as_json: bool, load_all: bool) -> None:
    """List plugins: where each came from, what it registered, and why it failed if it did.

    Plugins usually register their estimators by reference (imported on first use), so a plugin listed as ok
    has run its hooks; `--load` imports what they registered, too.
    """
    reg = registry()
    if load_all:
        use_torch()
        reg.load_all()
    records = [{"name": p.name, "distribution": p.distribution, "version": p.version, "status": p.status,
                "registered": p.registered, "error": p.error} for p in reg.plugins]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    table = Table(title="plugins", title_justify="left", header_style="bold")
    for column in ("name", "distribution", "version", "status", "registered", "error"):
        table.add_column(column)
    for r in records:
        status = "[green]ok[/]" if r["status"] == "ok" else f"[red]{r['status']}[/]"
        table.add_row(r["name"], r["distribution"], r["version"], status, ", ".join(r["registered"]),
                      r["error"] or "")
    out.print(table)


class OutputPath(click.ParamType):
    """A path epx will write (a file, or with ``directory`` a run directory), checked when the command line is
    read, so that a long run does not end in a file it cannot write."""

    name = "path"

    def __init__(self, *, directory: bool = False):
        self.directory = directory

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(value).expanduser()
        try:
            check_output(path, option=param.opts[0] if param else "path", directory=self.directory)
        except ConfigError as exc:
            self.fail(str(exc).split(": ", 1)[-1], param, ctx)
        return path


class FiniteFloat(click.ParamType):
    """A float that is finite (a NaN threshold can never fail) and, optionally, within [low, high]."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None):
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            self.fail(f"{value!r} is outside [{self.low}, {self.high}]", param, ctx)
        return number


def write_output(path: Path, write: Callable[[Path], None] | str) -> None:
    """Write a result file (``write(path)``, or the text itself atomically) and say so on stderr, naming the
    directories that had to be created for it."""
    created = check_output(path, option=str(path))
    if isinstance(write, str):
        write_atomic(path, write)
    else:
        write(path)
    made = f" (created {', '.join(str(d) for d in created)})" if created else ""
    err.print(f"wrote {escape(str(path))}{escape(made)}", highlight=False)


def apply_options(options: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def model_data_options(*, model_required: bool = True) -> list[Callable[..., Any]]:
    """The options that say which model, on which data, seed, device and dtype (compare, sweep, analyze, train)."""
    return [
        click.option("--model", "-m", "model_name", required=model_required,
                     help="Model to measure on (see `epx list models`)."),
        click.option("--model-set", "model_settings", multiple=True, metavar="KEY=VALUE",
                     help="Model option, e.g. s=0.5, T1=400, eps=0.1, project=true."),
        click.option("--data", default="auto", show_default=True,
                     help="Dataset (see `epx list datasets`); 'auto' uses the real data of the model's kind if found "
                          "(Fashion-MNIST for image models such as cet, tiny Shakespeare for text models such as "
                          "lm), else the generated 'sample' of that kind with a warning."),
        click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Where to look for data first (then $EPX_DATA_DIR, ~/.cache/epx, system locations)."),
        click.option("--no-download", is_flag=True, help="Never try to download data."),
        click.option("--batch-size", default=None, type=click.IntRange(min=1),
                     help="Samples per batch; default: the model's own (32 for cet and toy, 16 for lm)."),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
                     help=f"Seeds initialisation, data and masks; an integer from 0 to {SEED_MAX}."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float64"])),
    ]


dist_timeout_option = click.option(
    "--dist-timeout", "dist_timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
    help="Under torchrun: how long a process waits for the others before the job stops with an error (default "
         "1800; a sweep's processes meet after every round of points, so make it longer than the slowest point).")


@contextmanager
def processes(device: str, timeout: float | None) -> Iterator[Any]:
    """This process's place in a torchrun job (ep_core.distributed.World; one process when not launched by one).
    Only rank 0 prints (:func:`follow_launcher`)."""
    import signal

    from ep_core.distributed import DEFAULT_TIMEOUT, joined
    from ep_core.errors import DistributedError

    def stopped(signum: int, frame: Any) -> None:
        raise DistributedError("stopped by SIGTERM: the launcher ends the job when one of its processes has "
                               "failed (its error, or the launcher's report, says which), or the job was cancelled")

    with joined(device, timeout=DEFAULT_TIMEOUT if timeout is None else timeout) as world:
        if world.size > 1:
            # The processes torchrun ends with SIGTERM stop with one line each, not silently.
            signal.signal(signal.SIGTERM, stopped)
        yield world


eager_option = click.option(
    "--eager", is_flag=True,
    help="On CUDA, run every estimate step by step instead of replaying it as a CUDA graph (the default for ep, "
         "aep, adjoint and bptt with the plain solver); same numbers to float tolerance, slower.")


def comparison_options(*, repeats: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options that say what to compare on, shared by `compare` and `sweep`."""
    return apply_options([
        click.argument("estimators", nargs=-1, required=True),
        click.option("--ref", "reference", default="bptt", show_default=True, help="Reference estimator."),
        click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                     help="Estimator option, for every selected estimator that has it (beta=0.01) or one "
                          "(aep.clip=1)."),
        *model_data_options(),
        click.option("--repeats", default=repeats, show_default=True, type=click.IntRange(min=1),
                     help="Timed runs per estimator (after one warm-up); the median is reported."),
        eager_option,
    ])


def check_device(device: str) -> None:
    """Load torch (use_torch) and refuse a device epx cannot compute on here."""
    use_torch()
    from ep_core.session import resolve_device

    resolve_device(device)


def check_names(estimators: tuple[str, ...], model_name: str, reference: str, device: str) -> Registry:
    """Fail fast, before any data is loaded, on unknown names or an unusable device."""
    check_device(device)
    reg = registry()
    for name in estimators:
        reg.get("estimator", name)
    reg.get("model", model_name)
    reg.get("estimator", reference)
    if not [e for e in estimators if e != reference]:
        raise ConfigError("estimators", f"name at least one estimator besides the reference {reference!r}")
    if reg.failures:
        err.print(f"[yellow]warning:[/] {len(reg.failures)} plugin(s) failed to load; see `epx plugins`")
    return reg


def emit(result: dict[str, Any], renderables: list[Any], notes: list[str], *, as_json: bool,
         out_file: Path | None) -> None:
    """A result to stdout (JSON with --json, else the renderables; notes to stderr), then to --out, atomically:
    in that order, so that a file that cannot be written does not take the result with it."""
    text = json.dumps(result, indent=2, allow_nan=False)
    if as_json:
        click.echo(text)
    else:
        for renderable in renderables:
            out.print(renderable)
        for note in notes:
            err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if out_file is not None:
        write_output(out_file, text + "\n")


wide_option = click.option(
    "--wide", is_flag=True,
    help="One table per result at its natural width, however long the lines (by default a table wider than the "
         "terminal is split into several that each repeat the key column).")


class UnitLog:
    """Progress for a log file: when stderr is not a terminal (piped, redirected, CI), one plain line per finished
    unit of a long command (an estimator, a sweep point, a check), with its time, so that a long run is never
    silent. On a terminal the live status line or progress bar says it instead, and this prints nothing."""

    def __init__(self, what: str):
        self.what, self.enabled = what, not err.is_terminal
        self.current: str | None = None
        self.started = 0.0
        self.position = (0, 0)

    def start(self, label: str, done: int, total: int) -> None:
        """Unit ``label`` starts, after ``done`` of ``total``; the one before it has finished."""
        self.finish()
        if done < total:
            self.current, self.started, self.position = label, time.perf_counter(), (done + 1, total)

    def finish(self) -> None:
        if self.current is not None and self.enabled:
            number, total = self.position
            err.print(f"{self.what} [{number}/{total}] {escape(self.current)}: done in "
                      f"{time.perf_counter() - self.started:.1f} s", highlight=False)
        self.current = None


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message.removeprefix('warning: '))}", highlight=False)


@cli.command()
@comparison_options(repeats=3)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
@click.option("--out", "out_file", type=OutputPath(), default=None,
              help="Also write the comparison as JSON to this file (atomically).")
@click.option("--per-parameter/--no-per-parameter", default=None,
              help="Also show the cosine of every parameter's gradient. Default: shown for models with at most "
                   f"{PER_PARAMETER_AUTO} parameters (lm, toy), not for larger ones (cet).")
@click.option("--min-cosine", type=FiniteFloat(-1, 1), default=None,
              help="Exit 3 unless every estimator's overall cosine to the reference is at least this (for every "
                   "seed).")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Compare on N problems, seeds --seed to --seed+N-1 (each its own initialisation and batch), "
                   "measured together: on CUDA each estimator's N estimates replay as one CUDA graph that runs "
                   "them side by side. The table shows every seed and the mean; --json gives every comparison.")
@wide_option
def compare(estimators: tuple[str, ...], model_name: str, reference: str, settings: tuple[str, ...],
            model_settings: tuple[str, ...], data: str, data_dir: str | None, no_download: bool, batch_size: int,
            seed: int, device: str, dtype: str, repeats: int, eager: bool, as_json: bool, out_file: Path | None,
            per_parameter: bool | None, min_cosine: float | None, seeds: int, wide: bool) -> None:
    """Compare ESTIMATORS against the reference gradient on one model and batch.

    \b
    epx compare aep bptt --model cet
    epx compare ep aep adjoint --model cet --model-set s=0.5 --dtype float64 --set beta=0.001
    epx compare ep aep bptt --model lm --set aep.clip=1
    epx compare ep aep bptt --model lm --seeds 8 --device cuda
    """
    from ep_core.seeding import check_seed
    from ep_core.session import parse_settings, run_comparisons

    for extra in (seed, seed + seeds - 1):
        check_seed(extra, option="--seed/--seeds")
    reg = check_names(estimators, model_name, reference, device)
    log = UnitLog("compare")
    with err.status("starting") as status:
        def progress(label: str, done: int, total: int) -> None:
            status.update(f"[{done}/{total}] {label}")
            log.start(label, done, total)

        comparisons = run_comparisons(
            reg, estimators, model_name, reference=reference, seeds=list(range(seed, seed + seeds)),
            settings=parse_settings(settings, "--set"), model_settings=parse_settings(model_settings, "--model-set"),
            data=data, data_dir=data_dir, batch_size=batch_size, dtype=dtype, device=device,
            repeats=repeats, download=not no_download, warn=warn, progress=progress, eager=eager)
    results = [comparison.to_json() for comparison in comparisons]
    if seeds == 1:
        result = results[0]
        if per_parameter is None:
            per_parameter = len(result["results"][0]["metrics"]["parameters"]) <= PER_PARAMETER_AUTO
        renderables, notes = comparison_report(result, per_parameter=per_parameter), comparison_notes(result)
    else:
        result = {"format": SEEDS_FORMAT, "seeds": list(range(seed, seed + seeds)), "comparisons": results}
        renderables = seeds_report(result)
        notes = [f"seed {s}: {note}" for s, one in zip(result["seeds"], results) for note in comparison_notes(one)]
    with out.natural_width(wide):
        emit(result, renderables, notes, as_json=as_json, out_file=out_file)
    if min_cosine is not None:
        below = sorted({r["label"] for one in results for r in one["results"][1:]
                        if r["metrics"]["cosine"] is None or r["metrics"]["cosine"] < min_cosine})
        if below:
            raise ThresholdError(f"cosine below {min_cosine} for: {', '.join(below)}")


def main() -> None:
    cli(prog_name="epx")


STATUS_STYLE = {"passed": "green", "failed": "bold red", "xfail": "yellow", "xpass": "yellow", "warning": "yellow",
                "skipped": "dim"}


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Check the estimators with this option (as in compare: beta=0.01 or aep.clip=1).")
@click.option("--model", "-m", "models", multiple=True, metavar="MODEL",
              help="Check this model's declared protocols instead (ep_core.testing.check_model; repeatable), in "
                   "float64 on a batch of its data.")
@click.option("--model-set", "model_settings", multiple=True, metavar="KEY=VALUE",
              help="Model option for --model, e.g. s=0.5.")
@click.option("--data", default="auto", show_default=True,
              help="Dataset of --model's batch; 'sample' needs no files (see `epx list datasets`).")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Where to look for --model's data first.")
@click.option("--no-download", is_flag=True, help="Never try to download data.")
@click.option("--examples", default=10, show_default=True, type=click.IntRange(min=1),
              help="Random problems per check.")
@click.option("--check", "checks", multiple=True, metavar="CHECK", help="Run only this check (repeatable).")
@click.option("--suite", type=click.IntRange(min=1), default=None,
              help="Pin the suite version: failures of newer checks, and of assertions added to a check since, are "
                   "warnings. Default: the latest.")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON instead of tables.")
def check(names: tuple[str, ...], settings: tuple[str, ...], models: tuple[str, ...],
          model_settings: tuple[str, ...], data: str, data_dir: str | None, no_download: bool, examples: int,
          checks: tuple[str, ...], suite: int | None, as_json: bool) -> None:
    """Run the conformance suite (ep_core.testing.check_estimator) on the estimators NAMES, without pytest; with
    --model, the model checks (ep_core.testing.check_model) on each model.

    Every named check is listed with its status and time; a failure shows the violated rule and the (shrunk)
    problem Hypothesis found. Exit 0 when every estimator and model meets the contract, 3 when one does not.

    \b
    epx check ep aep adjoint
    epx check aep --set clip=1 --examples 25
    epx check --model lm --model cet --data sample
    """
    use_torch()
    from ep_core.session import build_estimators, parse_settings
    from ep_core.testing import CHECK_NAMES, SUITE_VERSION, check_estimator

    if not names and not models:
        raise click.UsageError("name an estimator to check, or a model with --model")
    if suite is not None and suite > SUITE_VERSION:
        raise ConfigError("--suite", f"{suite} is not a suite version; valid: 1 to {SUITE_VERSION} (the latest)")

    unknown = [c for c in checks if c not in CHECK_NAMES]
    if unknown:
        raise ConfigError("check", f"unknown check(s) {unknown}; valid: {', '.join(CHECK_NAMES)}")
    reg = registry()
    estimators = build_estimators(reg, names, parse_settings(settings, "--set")) if names else {}
    reports = [model_report(reg, name, parse_settings(model_settings, "--model-set"), data=data, data_dir=data_dir,
                            download=not no_download) for name in models]
    log = UnitLog("check")
    for done, (name, estimator) in enumerate(estimators.items()):
        log.start(name, done, len(estimators))
        with err.status(f"checking {name}: {len(checks) or len(CHECK_NAMES)} checks × {examples} problems"):
            reports.append(check_estimator(estimator, examples=examples, checks=checks or None, suite=suite,
                                           raise_on_failure=False))
    log.finish()
    if as_json:
        click.echo(json.dumps([r.to_json() for r in reports], indent=2))
    for report in reports if not as_json else []:
        table = Table(title=f"{report.estimator}: {report.heading}", title_justify="left", header_style="bold")
        for column in ("check", "status", "seconds", "detail"):
            table.add_column(column, overflow="fold")
        for result in report.results:
            table.add_row(result.name, Text(result.status, style=STATUS_STYLE[result.status]),
                          f"{result.seconds:.2f}", result.message)
        out.print(table)
    failed = [r.estimator for r in reports if not r.passed]
    if failed:
        raise ThresholdError(f"the contract is not met by: {', '.join(failed)}")


def model_report(reg: Registry, name: str, settings: dict[str, str], *, data: str, data_dir: str | None,
                 download: bool) -> Any:
    """ep_core.testing.check_model's report on the model ``name``, in float64, on seed 0's batch of its data."""
    import torch

    from ep_core.protocols import EquilibriumModel
    from ep_core.session import build_batch, build_model, model_data
    from ep_core.testing import check_model

    dataset = model_data(reg, reg.get("model", name).factory, data, settings, data_dir=data_dir, download=download,
                         warn=lambda message: err.print(f"[yellow]warning:[/] {message}"))
    model = build_model(reg, name, settings, dtype=torch.float64, dataset=dataset)
    if not isinstance(model, EquilibriumModel):
        raise ConfigError("model", f"{name} has no fixed point, and check_model checks the protocols of equilibrium "
                                   "models")
    with err.status(f"checking model {name}"):
        report = check_model(model, build_batch(model, dataset).batch, raise_on_failure=False)
    report.estimator = name
    return report


def _add_commands() -> None:
    # Imported here: these modules build on the helpers above.
    from epx_cli.analyze import analyze
    from epx_cli.sweep import sweep

    cli.add_command(sweep)
    cli.add_command(analyze)


_add_commands()
