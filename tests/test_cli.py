"""The command line: outputs, exit codes and messages, in-process through click's runner."""

import json
import re

import pytest
import torch
from click.testing import CliRunner
from epx_cli import main as cli_main

import ep_core.datasets.fashionmnist

SMALL_CET = ["--model-set", "dim=16", "--model-set", "heads=2", "--model-set", "head_dim=8",
             "--model-set", "memories=16", "--model-set", "T1=60", "--batch-size", "4", "--repeats", "1"]


@pytest.fixture
def epx():
    cli_main.registry.cache_clear()
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli_main.cli, list(args), catch_exceptions=False)

    yield invoke
    cli_main.registry.cache_clear()


def test_compare_json_and_out_file_agree(epx, tmp_path):
    out = tmp_path / "deep" / "result.json"
    result = epx("compare", "ep", "aep", "adjoint", "--model", "toy", "--dtype", "float64", "--json",
                 "--out", str(out), "--set", "beta=0.001", "--set", "T2=300", "--repeats", "2")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert json.loads(out.read_text()) == printed
    rows = {r["label"]: r for r in printed["results"]}
    assert list(rows) == ["bptt", "ep", "aep", "adjoint"]
    assert printed["data"]["name"] == "synthetic"
    assert rows["ep"]["config"] == {"beta": 0.001, "T2": 300, "centered": True}
    for label in ("ep", "aep", "adjoint"):
        assert rows[label]["metrics"]["cosine"] > 0.999
        assert rows[label]["deterministic"] is True
        assert rows[label]["converged"] is True
    # The toy evaluates F − N alone: aep's nudged steps take −∇E, not F, and N once, at x*, for J_Nᵀ.
    assert rows["aep"]["force_evals"] == rows["ep"]["force_evals"] - 2 * 300
    assert rows["aep"]["stats"]["conservative_evals"] == 2 * 300
    assert rows["aep"]["stats"]["nonconservative_evals"] == 1
    assert len(rows["adjoint"]["ms"]) == 2


def test_compare_on_real_fashion_mnist_records_the_dataset(epx, real_data_dir):
    result = epx("compare", "aep", "bptt", "--model", "cet", "--data", "fashionmnist", "--data-dir",
                 str(real_data_dir), "--json", *SMALL_CET)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["data"]["name"] == "fashionmnist"
    assert data["data"]["batch_size"] == 4
    aep = data["results"][1]
    assert set(aep["metrics"]["groups"]) == {"attention", "memory", "encoder", "decoder"}
    assert aep["metrics"]["cosine"] > 0.9


def test_zero_reference_group_is_na_not_nan(epx):
    result = epx("compare", "adjoint", "--model", "cet", "--data", "sample", "--model-set", "s=0", "--json",
                 *SMALL_CET)
    assert result.exit_code == 0, result.stderr
    adjoint = json.loads(result.stdout)["results"][1]
    assert adjoint["metrics"]["groups"]["attention"] is None
    assert adjoint["metrics"]["groups"]["decoder"] > 0.99
    table = epx("compare", "adjoint", "--model", "cet", "--data", "sample", "--model-set", "s=0", *SMALL_CET)
    assert "n/a" in table.stdout and "nan" not in table.stdout.lower()


def test_auto_falls_back_to_sample_with_one_warning(epx, monkeypatch, tmp_path):
    monkeypatch.delenv("EPX_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ep_core.datasets.fashionmnist, "fashion_mnist_search_path",
                        lambda data_dir=None: [tmp_path / "nowhere"])

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(ep_core.datasets.fashionmnist, "download_fashion_mnist", offline)
    result = epx("compare", "aep", "--model", "cet", "--json", *SMALL_CET)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["data"]["name"] == "sample"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "sample" in warnings[0]


@pytest.mark.parametrize("args, fragment", [
    (["compare", "aepp", "--model", "cet"], "did you mean 'aep'"),
    (["compare", "aep", "--model", "cte"], "did you mean 'cet'"),
    (["compare", "aep", "--model", "cet", "--set", "beta=-1"], "beta: -1.0 is out of range; valid: > 0"),
    (["compare", "aep", "--model", "cet", "--set", "betta=0.1"], "did you mean 'beta'"),
    (["compare", "aep", "--model", "cet", "--model-set", "s=abc"], "s: expected float"),
    (["compare", "aep", "--model", "cet", "--set", "ep.beta=0.1"], "'ep' is not among the estimators"),
    (["compare", "bptt", "--model", "cet"], "besides the reference"),
    (["info", "adjiont"], "did you mean 'adjoint'"),
])
def test_usage_errors_exit_2_with_a_message(epx, args, fragment):
    result = epx(*args)
    assert result.exit_code == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_divergence_exits_1_naming_the_step_and_a_remedy(epx):
    result = epx("compare", "aep", "--model", "cet", "--data", "sample", "--model-set", "eps=5", *SMALL_CET)
    assert result.exit_code == 1
    assert "diverged at step" in result.stderr and "eps=5" in result.stderr
    assert "lower the step size" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_min_cosine_threshold_exits_3(epx):
    ok = epx("compare", "adjoint", "--model", "toy", "--min-cosine", "0.999", "--repeats", "1")
    assert ok.exit_code == 0, ok.stderr
    failed = epx("compare", "ep", "--model", "toy", "--model-set", "conservative=false", "--set", "T2=2",
                 "--min-cosine", "0.9999", "--repeats", "1")
    assert failed.exit_code == 3
    assert "cosine below 0.9999 for: ep" in failed.stderr


def test_list_info_and_plugins(epx):
    listed = epx("list")
    assert listed.exit_code == 0
    for name in ("bptt", "ep", "aep", "adjoint", "cet", "toy", "fashionmnist", "sample", "auto"):
        assert name in listed.stdout
    info = epx("info", "aep")
    assert info.exit_code == 0
    assert "beta" in info.stdout and "> 0" in info.stdout and "exact limit" in info.stdout
    assert "clip" in info.stdout
    model_info = epx("info", "cet")
    assert "project" in model_info.stdout and "mask_ratio" in model_info.stdout
    plugins = epx("plugins", "--json")
    records = {r["name"]: r for r in json.loads(plugins.stdout)}
    assert records["aep"]["registered"] == ["estimator:aep"]
    assert records["ep_core"]["status"] == "ok"


def test_cli_reference_documents_every_option():
    from pathlib import Path

    reference = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    import click

    def walk(command):
        yield command
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                yield from walk(sub)

    commands = list(walk(cli_main.cli))
    assert {"sweep", "antisymmetry", "fixed-point"} <= {c.name for c in commands}
    for command in commands:
        for param in command.params:
            for flag in param.opts:
                if flag.startswith("--"):
                    assert f"`{flag}" in reference, f"docs/cli.md does not document {command.name} {flag}"


def test_check_model_passes_the_reference_models_and_names_a_broken_promise(epx, monkeypatch):
    ok = epx("check", "--model", "lm", "--model", "cet", "--data", "sample", "--json")
    assert ok.exit_code == 0, ok.stderr
    reports = {r["estimator"]: {c["name"]: c["status"] for c in r["results"]} for r in json.loads(ok.stdout)
               if r["title"] == "epx model checks"}
    assert reports["lm"]["cost_gradient"] == reports["lm"]["split_force"] == reports["lm"]["gradient_part"] == "passed"
    assert reports["lm"]["conservative"] == reports["cet"]["conservative"] == "passed"
    assert reports["cet"]["cost_gradient"] == "skipped" and reports["cet"]["split_force"] == "passed"

    from ep_core.models.toy import Toy
    from ep_core.plugins import hookimpl, load

    class Hiding(Toy):
        """Declares no non-conservative part while its coupling has one."""

        def nonconservative(self, state, batch):
            return tuple(torch.zeros_like(t) for t in state)

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register("hiding", Hiding)

    monkeypatch.setattr(cli_main, "registry", lambda: load(plugins=[("hiding", Plugin())]))
    broken = epx("check", "--model", "hiding", "--model-set", "conservative=false")
    assert broken.exit_code == 3 and "the contract is not met by: hiding" in broken.stderr
    assert "gradient_part" in broken.stdout and "not a gradient field" in broken.stdout.replace("\n", "")
    assert epx("check", "--model", "resmlp", "--data", "sample").exit_code == 2
    nothing = epx("check")
    assert nothing.exit_code == 2 and "name an estimator to check, or a model with --model" in nothing.stderr


def test_check_passes_builtins_and_fails_a_broken_estimator(epx, monkeypatch):
    ok = epx("check", "adjoint", "bptt", "--examples", "2", "--json")
    assert ok.exit_code == 0, ok.stderr
    reports = {r["estimator"]: r for r in json.loads(ok.stdout)}
    adjoint = {r["name"]: r["status"] for r in reports["adjoint"]["results"]}
    assert adjoint.pop("state_round_trip") == adjoint.pop("declared_properties") == "skipped"  # none declared
    assert adjoint.pop("stacked_problems") == "skipped"  # adjoint is not Batchable
    assert {r["name"]: r["status"] for r in reports["bptt"]["results"]}["stacked_problems"] == "passed"
    assert set(adjoint.values()) == {"passed"}
    bptt = {r["name"]: r["status"] for r in reports["bptt"]["results"]}
    assert bptt["exact_limit"] == bptt["cost_scaling"] == "skipped" and bptt["deterministic"] == "passed"

    from ep_core.bptt import BPTT
    from ep_core.plugins import hookimpl, load

    class Sloppy(BPTT):
        """bptt that also scribbles on param.grad: a contract violation."""

        name = "sloppy"

        def estimate(self, model, batch, *, generator):
            result = super().estimate(model, batch, generator=generator)
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            return result

    class Plugin:
        @hookimpl
        def register_estimators(self, register):
            register("sloppy", Sloppy)

    monkeypatch.setattr(cli_main, "registry", lambda: load(plugins=[("sloppy", Plugin())], entry_points=False))
    broken = epx("check", "sloppy", "--examples", "2", "--check", "param_grad_untouched", "--check", "deterministic")
    assert broken.exit_code == 3
    assert "the contract is not met by: sloppy" in broken.stderr
    assert "param_grad_untouched" in broken.stdout and "failed" in broken.stdout
    assert "never touch param.grad" in broken.stdout.replace("\n", "")
    typo = epx("check", "sloppy", "--check", "determinstic")
    assert typo.exit_code == 2


def test_compare_says_which_phases_did_not_reach_the_solvers_tolerance(epx):
    settings = ["--model", "toy", "--dtype", "float64", "--model-set", "solver=anderson",
                "--model-set", "tol=1e-10", "--set", "beta=0.001", "--repeats", "1"]
    short = epx("compare", "ep", "aep", *settings, "--set", "T2=3")
    assert short.exit_code == 0, short.stderr
    assert "tolerance NOT reached (tol = 1e-10): ep (2 nudged phases); aep (2 nudged phases)" in short.stdout
    # aep's nudged steps evaluate −∇E alone on the toy, and the F evals column says so beside its forces.
    assert re.search(r"│ aep .*│ +\d+ \+ 6 −∇E │", short.stdout)
    long = epx("compare", "ep", "aep", *settings, "--set", "T2=300")
    assert long.exit_code == 0, long.stderr
    assert "tolerance NOT reached" not in long.stdout
    seeds = epx("compare", "ep", *settings, "--set", "T2=3", "--seeds", "2")
    assert seeds.exit_code == 0, seeds.stderr
    printed = " ".join(seeds.stdout.split())
    assert ("tolerance NOT reached (tol = 1e-10) in seed 0: ep (2 nudged phases) stopped on their bound of "
            "evaluations (T1, T2) or where the residual stopped falling (and in 1 more seed)") in printed
