"""The `epx` command line. Results go to stdout (a rich table, or JSON); progress, warnings and errors to stderr.

Exit codes: 0 ok · 1 runtime failure (divergence, missing data) · 2 usage error (unknown name, bad option)
· 3 a requested threshold was not met.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ep_core.errors import ConfigError, EpxError, Interrupted, PluginError, ThresholdError, UnknownNameError
from ep_core.files import write_atomic
from ep_core.plugins import Registry, load
from epx_cli.render import comparison_notes, comparison_table, parameter_table

PER_PARAMETER_AUTO = 6

# Piped output keeps every column of the comparison table instead of wrapping at rich's default 80.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


@functools.cache
def registry() -> Registry:
    return load()


def fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    sys.exit(code)


def report(exc: EpxError) -> None:
    """Print an expected failure on one line and exit with the code its class carries."""
    if isinstance(exc, Interrupted):
        err.print(f"[bold yellow]interrupted:[/] {escape(str(exc).removeprefix('interrupted '))}", highlight=False)
        sys.exit(exc.exit_code)
    fail(str(exc), exc.exit_code)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Map epx's exceptions to exit codes (from the class alone) and one-line messages; no tracebacks for expected
    failures. Ctrl-C is an :class:`Interrupted` (exit 130) rather than click's bare "Aborted!"."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            report(Interrupted(f"during `epx {click.get_current_context().command_path.removeprefix('epx ')}`"))
        except EpxError as exc:
            report(exc)
    return wrapper


class EpxGroup(click.Group):
    """Adds plugins' commands on first use, so `epx` works even if a plugin's commands fail."""

    def _plugin_commands(self) -> None:
        if not getattr(self, "_loaded", False):
            self._loaded = True
            try:
                registry().add_commands(self)
            except PluginError as exc:
                report(exc)

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
def cli(threads: int) -> None:
    """epx: gradient estimators that avoid or approximate backpropagation, measured against the exact gradient.

    \b
    epx compare aep bptt --model cet      how close is AEP to the true gradient on cet?
    epx list                              what is installed
    epx info aep                          an estimator's options and exact limit
    epx plugins                           which plugins loaded, and which failed
    """
    import torch

    torch.set_num_threads(threads)


KIND_OPTIONS = {"estimators": "estimator", "models": "model", "datasets": "dataset"}


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(sorted(KIND_OPTIONS)))
@handle_errors
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
@handle_errors
def info(name: str) -> None:
    """Show what NAME (an estimator, model or dataset) is: summary, exact limit, options and their ranges."""
    reg = registry()
    matches = [reg.entries[k][name] for k in ("estimator", "model", "dataset") if name in reg.entries[k]]
    if not matches:
        every = [n for k in ("estimator", "model", "dataset") for n in reg.names(k)]
        raise UnknownNameError("estimator, model or dataset", name, every)
    for entry in matches:
        factory = entry.factory
        out.print(f"[bold]{entry.name}[/] ({entry.kind}, from plugin {entry.plugin}): {entry.summary}")
        if getattr(factory, "exact_limit", None):
            out.print(f"exact limit: {factory.exact_limit}")
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
@handle_errors
def plugins(as_json: bool) -> None:
    """List plugins: where each came from, what it registered, and why it failed if it did."""
    reg = registry()
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


def apply_options(options: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def model_data_options() -> list[Callable[..., Any]]:
    """The options that say which model, on which data, seed, device and dtype (compare, sweep, analyze)."""
    return [
        click.option("--model", "-m", "model_name", required=True,
                     help="Model to measure on (see `epx list models`)."),
        click.option("--model-set", "model_settings", multiple=True, metavar="KEY=VALUE",
                     help="Model option, e.g. s=0.5, T1=400, eps=0.1, project=true."),
        click.option("--data", default="auto", show_default=True,
                     help="Dataset; 'auto' uses Fashion-MNIST if found, else the generated 'sample' set with a "
                          "warning."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Where to look for data first (then $EPX_DATA_DIR, ~/.cache/epx, system locations)."),
        click.option("--no-download", is_flag=True, help="Never try to download data."),
        click.option("--batch-size", default=None, type=click.IntRange(min=1),
                     help="Samples per batch; default: the model's own (32 for cet and toy, 16 for lm)."),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="Seeds initialisation, data and masks."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float64"])),
    ]


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
    ])


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r} requested but CUDA is not available here")


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
    """A result to --out (atomically) and to stdout: JSON with --json, else the renderables; notes to stderr."""
    text = json.dumps(result, indent=2, allow_nan=False)
    if out_file is not None:
        write_atomic(out_file, text + "\n")
        err.print(f"wrote {escape(str(out_file))}", highlight=False)
    if as_json:
        click.echo(text)
        return
    for renderable in renderables:
        out.print(renderable)
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message.removeprefix('warning: '))}", highlight=False)


@cli.command()
@comparison_options(repeats=3)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the comparison as JSON to this file (atomically).")
@click.option("--per-parameter/--no-per-parameter", default=None,
              help="Also show the cosine of every parameter's gradient. Default: shown for models with at most "
                   f"{PER_PARAMETER_AUTO} parameters (lm, toy), not for larger ones (cet).")
@click.option("--min-cosine", type=float, default=None,
              help="Exit 3 unless every estimator's overall cosine to the reference is at least this.")
@handle_errors
def compare(estimators: tuple[str, ...], model_name: str, reference: str, settings: tuple[str, ...],
            model_settings: tuple[str, ...], data: str, data_dir: str | None, no_download: bool, batch_size: int,
            seed: int, device: str, dtype: str, repeats: int, as_json: bool, out_file: Path | None,
            per_parameter: bool | None, min_cosine: float | None) -> None:
    """Compare ESTIMATORS against the reference gradient on one model and batch.

    \b
    epx compare aep bptt --model cet
    epx compare ep aep adjoint --model cet --model-set s=0.5 --dtype float64 --set beta=0.001
    epx compare ep aep bptt --model lm --set aep.clip=1
    """
    from ep_core.session import parse_settings, run_comparison

    reg = check_names(estimators, model_name, reference, device)
    with err.status("starting") as status:
        def progress(label: str, done: int, total: int) -> None:
            status.update(f"[{done}/{total}] {label}")

        comparison = run_comparison(
            reg, estimators, model_name, reference=reference,
            settings=parse_settings(settings, "--set"), model_settings=parse_settings(model_settings, "--model-set"),
            data=data, data_dir=data_dir, batch_size=batch_size, seed=seed, dtype=dtype, device=device,
            repeats=repeats, download=not no_download, warn=warn, progress=progress)
    result = comparison.to_json()
    if per_parameter is None:
        per_parameter = len(result["results"][0]["metrics"]["parameters"]) <= PER_PARAMETER_AUTO
    tables = [comparison_table(result)] + ([parameter_table(result)] if per_parameter else [])
    emit(result, tables, comparison_notes(result), as_json=as_json, out_file=out_file)
    if min_cosine is not None:
        below = [r["label"] for r in result["results"][1:]
                 if r["metrics"]["cosine"] is None or r["metrics"]["cosine"] < min_cosine]
        if below:
            raise ThresholdError(f"cosine below {min_cosine} for: {', '.join(below)}")


def main() -> None:
    cli(prog_name="epx")


STATUS_STYLE = {"passed": "green", "failed": "bold red", "xfail": "yellow", "xpass": "yellow", "warning": "yellow",
                "skipped": "dim"}


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Check the estimators with this option (as in compare: beta=0.01 or aep.clip=1).")
@click.option("--examples", default=10, show_default=True, type=click.IntRange(min=1),
              help="Random problems per check.")
@click.option("--check", "checks", multiple=True, metavar="CHECK", help="Run only this check (repeatable).")
@click.option("--suite", type=click.IntRange(min=1), default=None,
              help="Pin the suite version: failures of newer checks are warnings. Default: the latest.")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON instead of tables.")
@handle_errors
def check(names: tuple[str, ...], settings: tuple[str, ...], examples: int, checks: tuple[str, ...],
          suite: int | None, as_json: bool) -> None:
    """Run the conformance suite (ep_core.testing.check_estimator) on the estimators NAMES, without pytest.

    Every named check is listed with its status and time; a failure shows the violated rule and the (shrunk)
    problem Hypothesis found. Exit 0 when every estimator meets the contract, 3 when one does not.

    \b
    epx check ep aep adjoint
    epx check aep --set clip=1 --examples 25
    """
    from ep_core.session import parse_settings, split_estimator_settings
    from ep_core.testing import CHECK_NAMES, check_estimator

    unknown = [c for c in checks if c not in CHECK_NAMES]
    if unknown:
        raise ConfigError("check", f"unknown check(s) {unknown}; valid: {', '.join(CHECK_NAMES)}")
    reg = registry()
    classes = {name: reg.get("estimator", name).factory for name in dict.fromkeys(names)}
    routed = split_estimator_settings(parse_settings(settings, "--set"), classes)
    reports = []
    for name, cls in classes.items():
        estimator = cls(cls.Config.from_mapping(routed[name]))
        with err.status(f"checking {name}: {len(checks) or len(CHECK_NAMES)} checks × {examples} problems"):
            reports.append(check_estimator(estimator, examples=examples, checks=checks or None, suite=suite,
                                           raise_on_failure=False))
    if as_json:
        click.echo(json.dumps([r.to_json() for r in reports], indent=2))
    for report in reports if not as_json else []:
        table = Table(title=f"{report.estimator}: epx conformance suite {report.suite}", title_justify="left",
                      header_style="bold")
        for column in ("check", "status", "seconds", "detail"):
            table.add_column(column, overflow="fold")
        for result in report.results:
            table.add_row(result.name, Text(result.status, style=STATUS_STYLE[result.status]),
                          f"{result.seconds:.2f}", result.message)
        out.print(table)
    failed = [r.estimator for r in reports if not r.passed]
    if failed:
        raise ThresholdError(f"the contract is not met by: {', '.join(failed)}")


def _add_commands() -> None:
    # Imported here: these modules build on the helpers above.
    from epx_cli.analyze import analyze
    from epx_cli.sweep import sweep

    cli.add_command(sweep)
    cli.add_command(analyze)


_add_commands()
