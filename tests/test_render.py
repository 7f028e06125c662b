"""Tables fit the console without cutting a number or a header; legends; the width of stdout; sweeps' failures."""

import io
import json
import re

import pytest
from click.testing import CliRunner
from epx_cli import main as cli_main
from epx_cli.render import (NATURAL_WIDTH, PIPED_WIDTH, StdoutConsole, comparison_report, comparison_title,
                            sweep_report)
from rich.console import Console, Group

from ep_core.sweep import summarize

GROUPS = ["attention", "memory", "encoder", "decoder"]
PARAMETERS = ["W_enc", "pos", "memories", "W_dec", "b_dec", "W_Q", "W_K", "W_V", "W_O"]
# Cosines of every kind fmt_cosine meets: near 1, ordinary, negative, near 0 (where 4 decimals are too few).
COSINES = {"ep": [0.949123, 0.658147, 0.534012, -0.627834, 0.996712],
           "aep": [0.994218, 0.988034, 0.0123456, 0.985012, 0.99967],
           "adjoint": [0.9999987, 0.99953, 0.999991, -0.0532107, 0.9999]}
NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]\d+)?")


def result_row(label, cosines, *, converged=True):
    overall, *groups = cosines
    return {"label": label, "estimator": label, "deterministic": True, "converged": converged,
            "residual": 1.2e-5 if converged else 3.4e-3, "ms_median": 420.37, "peak_memory_bytes": None,
            "force_evals": 121, "fixed_point_distance": {},
            "metrics": {"cosine": overall, "groups": dict(zip(GROUPS, groups)), "rel_error": 0.000305,
                        "norm_ratio": 0.914, "parameters": {p: cosines[i % 5] for i, p in enumerate(PARAMETERS)}}}


def comparison(converged=True):
    results = [result_row("bptt", [1.0] * 5, converged=converged)]
    results += [result_row(label, cosines, converged=converged) for label, cosines in COSINES.items()]
    return {"format": "epx.comparison/1", "reference": "bptt", "parameter_groups": {g: [] for g in GROUPS},
            "model": {"name": "cet", "config": {"s": 1.0, "T1": 120, "eps": 0.2, "project": False}},
            "data": {"name": "sample", "batch_size": 32}, "dtype": "float32", "device": "cpu", "seed": 0,
            "converged_tol": 1e-4, "results": results,
            "fixed_point": {"spectral_radius": 0.9376, "stable": True, "resolved": True}}


def render(renderables, width):
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(Group(*renderables))
    return console.export_text()


def significant_digits(token):
    mantissa = token.lstrip("-").split("e")[0]
    return len(mantissa.replace(".", "").lstrip("0"))


def assert_cosines_shown(text, cosines):
    """Every cosine appears as a number with at least 4 significant digits that rounds to it."""
    tokens = NUMBER.findall(text)
    for value in cosines:
        assert any(significant_digits(t) >= 4 and abs(float(t) - value) <= 0.5e-4 for t in tokens), value


def assert_fits(text, width):
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width


def words(text):
    return " ".join(text.split())


@pytest.mark.parametrize("width", [80, 120, 200])
def test_comparison_fits_the_width_with_every_digit_and_header(width):
    data = comparison()
    text = render(comparison_report(data, per_parameter=True), width)
    assert_fits(text, width)
    assert_cosines_shown(text, [c for cosines in COSINES.values() for c in cosines])
    for header in ["estimator", "residual", "evals", "ratio", *GROUPS, *PARAMETERS]:
        assert re.search(rf"\b{header}\b", text), header
    # The title is a line of its own, wrapped at spaces only.
    assert words(comparison_title(data)) in words(text)
    tables = text.count("┏")
    # Every table, stacked or not, repeats the key column.
    assert text.count("estimator") == tables
    assert tables == (2 if width >= 120 else 4)


def test_legend_states_the_colours_and_a_non_converged_residual_is_marked_in_text():
    text = render(comparison_report(comparison(converged=False), per_parameter=False), 120)
    assert "green ≥ 0.999" in text and "yellow ≥ 0.99" in text and "red < 0.99" in text
    assert "marked ! above 1e-04" in text
    assert text.count("3.4e-03 !") == 4


def sweep_payload():
    """Two seeds at eps=0.1 (one failed, one did not converge), all of eps=5 failed, both of eps=0.2 fine."""
    message = ("relaxation diverged at step 12 (non-finite state); lower the step size (--model-set eps=5 is "
               "too large for this model) or raise the number of steps, and check the data; the end of this "
               "message is here: UNMISTAKABLE-TAIL")

    def ok(values, seed, cosine, converged=True):
        results = [{"label": label, "residual": 1e-5 if converged else 2e-2, "converged": converged,
                    "ms_median": 40.0, "fixed_point_distance": {"aep": 0.0},
                    "metrics": {"cosine": c, "groups": {"attention": c}}}
                   for label, c in (("bptt", 1.0), ("aep", cosine))]
        return {"id": f"{values}{seed}", "values": values, "seed": seed, "status": "ok",
                "comparison": {"reference": "bptt", "results": results}}

    def failed(values, seed):
        return {"id": f"{values}{seed}", "values": values, "seed": seed, "status": "failed", "error": message}

    records = [ok({"eps": "0.1"}, 0, 0.98765, converged=False), failed({"eps": "0.1"}, 1),
               ok({"eps": "0.2"}, 0, 0.99912), ok({"eps": "0.2"}, 1, 0.99934),
               failed({"eps": "5"}, 0), failed({"eps": "5"}, 1)]
    spec = {"estimators": ["aep"], "reference": "bptt", "model": "cet", "seeds": [0, 1]}
    return {"spec": spec, "axes": [{"key": "eps", "owners": ["model"], "values": ["0.1", "0.2", "5"]}],
            "records": records}, message


@pytest.mark.parametrize("width", [80, 200])
def test_sweep_shows_seeds_and_lists_failures_whole(width):
    payload, message = sweep_payload()
    text = render(sweep_report(payload, summarize(payload, group="attention"), "attention"), width)
    assert_fits(text, width)
    assert_cosines_shown(text, [0.98765, 0.99923])
    assert "0.99923 ± 0.0001" in text
    assert text.count("2.0e-02 !") == 1 and "1.0e-05 ± 0.0e+00 │" in text
    for seeds in ("1/2", "2/2", "0/2"):
        assert seeds in text
    # The failures have their own table: every message whole (wrapped), each point once with its seeds.
    failures = text[text.index("failed runs: 3 of 6"):]
    plain = words(re.sub(r"[│┃┏┓┗┛━─┡┩╇┳┻┃└┘┴┬]", " ", failures))
    assert plain.count(words(message)) == 2
    assert re.search(r"\b0\.1 1 relaxation diverged", plain) and re.search(r"\b5 0, 1 relaxation diverged", plain)
    assert text.count("UNMISTAKABLE-TAIL") == 2
    assert "seeds: succeeded/run" in text
    assert "ms: median per gradient" in words(text)


def test_a_sweep_says_when_its_ms_are_those_of_problems_measured_together():
    payload, _ = sweep_payload()
    for record in payload["records"]:
        if record["status"] == "ok":
            record["comparison"]["group"] = {"size": 6}
    text = words(render(sweep_report(payload, summarize(payload), None), 200))
    assert "ms: median of one run of all the problems measured together (6:" in text
    assert "ms: median per gradient" not in text


def test_stdout_width_follows_columns_then_the_pipe_default_and_wide(monkeypatch):
    console = StdoutConsole(file=io.StringIO())
    monkeypatch.setenv("COLUMNS", "93")
    assert console.width == 93
    monkeypatch.delenv("COLUMNS")
    assert console.width == PIPED_WIDTH
    with console.natural_width(True):
        assert console.width == NATURAL_WIDTH
    with console.natural_width(False):
        assert console.width == PIPED_WIDTH
    assert console.width == PIPED_WIDTH


SMALL_CET = ["--model-set", "dim=16", "--model-set", "heads=2", "--model-set", "head_dim=8",
             "--model-set", "memories=16", "--model-set", "T1=60", "--batch-size", "4", "--repeats", "1"]


@pytest.fixture
def epx():
    cli_main.registry.cache_clear()
    yield lambda *args, env: CliRunner(env=env).invoke(cli_main.cli, list(args), catch_exceptions=False)
    cli_main.registry.cache_clear()


def test_compare_at_80_columns_shows_every_cosine_with_4_digits(epx, tmp_path):
    out = tmp_path / "cet.json"
    result = epx("compare", "ep", "aep", "adjoint", "bptt", "--model", "cet", "--data", "sample", "--out", str(out),
                 *SMALL_CET, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    assert_fits(result.stdout, 80)
    data = json.loads(out.read_text())
    cosines = [r["metrics"]["cosine"] for r in data["results"]]
    cosines += [c for r in data["results"] for c in r["metrics"]["groups"].values() if c is not None]
    assert len(cosines) == 4 * 5
    assert_cosines_shown(result.stdout, cosines)
    assert result.stdout.count("┏") > 1


def test_wide_prints_one_table_however_narrow_the_terminal(epx):
    narrow = epx("compare", "adjoint", "--model", "toy", "--repeats", "1", env={"COLUMNS": "40"})
    wide = epx("compare", "adjoint", "--model", "toy", "--repeats", "1", "--wide", env={"COLUMNS": "40"})
    assert narrow.exit_code == wide.exit_code == 0, narrow.stderr + wide.stderr
    assert_fits(narrow.stdout, 40)
    assert wide.stdout.count("┏") == 2 < narrow.stdout.count("┏")
    assert max(len(line) for line in wide.stdout.splitlines()) > 40
    assert "…" not in wide.stdout


def test_the_title_says_which_rows_were_captured_and_which_stacked():
    data = comparison()
    assert "CUDA graphs" not in comparison_title(data)
    for row, execution in zip(data["results"], ["captured", "stacked", "stacked", "eager"]):
        row["execution"] = execution
    data["group"] = {"size": 8, "note": ""}
    title = comparison_title(data)
    assert "(CUDA graphs: bptt, ep, aep; ep, aep stacked over the 8 problems)" in title
    for row in data["results"]:
        row["execution"] = "captured"
    assert "(CUDA graphs)" in comparison_title(data)


def test_a_comparison_names_the_phases_that_stopped_at_the_states_resolution_and_those_short_of_tol():
    """A tolerance solver's phases, as the harness records them: one that stopped on its bound (not converged),
    ones that converged above tol because the state resolves no finer (float32's nudged phases), and ones within
    tol, which no note names."""
    data = comparison()
    data["model"]["config"]["tol"] = 1e-6
    phases = {"ep": [("free", 17, True, 8.7e-7), ("nudged", 15, True, 1.7e-5), ("nudged", 10, True, 2.0e-5)],
              "aep": [("free", 17, True, 8.7e-7), ("nudged", 20, False, 3.1e-4), ("nudged", 10, True, 2.4e-5)],
              "adjoint": [("free", 17, True, 8.7e-7)]}
    for row in data["results"]:
        row["stats"] = {"phases": [dict(zip(("phase", "evaluations", "converged", "residual"), p))
                                   for p in phases.get(row["label"], [])]}
    text = " ".join(render(comparison_report(data, per_parameter=False), 200).split())
    assert ("tolerance NOT reached (tol = 1e-06): aep (1 nudged phase) stopped on their bound of evaluations" in text)
    assert ("tol = 1e-06 is finer than the state resolves: ep (2 nudged phases, residual up to 2.0e-05); aep "
            "(1 nudged phase, residual up to 2.4e-05) stopped within one rounding of the state") in text
    assert "adjoint (" not in text
