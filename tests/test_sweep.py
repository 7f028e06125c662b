"""Sweeps: grid expansion, key ownership, failure records, resume after interruption, plots."""

import builtins
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner
from epx_cli import main as cli_main
from epx_estimators.aep import AEP
from epx_estimators.ep import EP

from ep_core.config import Config, ConfigError, option
from ep_core.models.cet import CET
from ep_core.plugins import load
from ep_core.sweep import SweepMismatch, SweepSpec, grid, parse_vary, resolve_axes, run_sweep, summarize

SMALL_CET = {"dim": "16", "heads": "2", "head_dim": "8", "memories": "16", "T1": "40"}


def test_grid_is_the_product_in_the_given_order_times_seeds():
    axes = resolve_axes(["s=0,1", "beta=0.1,0.2,0.3"], CET, {"ep": EP, "aep": AEP})
    points = grid(axes, seeds=(4, 5))
    assert len(points) == 2 * 3 * 2
    assert [p.values for p in points[:4]] == [{"s": "0", "beta": "0.1"}] * 2 + [{"s": "0", "beta": "0.2"}] * 2
    assert [p.seed for p in points[:4]] == [4, 5, 4, 5]
    assert len({p.id for p in points}) == len(points)


def test_keys_are_routed_to_their_owners():
    estimators = {"ep": EP, "aep": AEP}
    s, beta, scoped, clip, model_t1 = resolve_axes(
        ["s=1", "beta=0.1", "aep.T2=5", "clip=1", "model.T1=10"], CET, estimators)
    assert s.owners == ("model",)
    assert beta.owners == ("ep", "aep")
    assert scoped.owners == ("aep",) and scoped.field == "T2"
    assert clip.owners == ("aep",)
    assert model_t1.owners == ("model",) and model_t1.field == "T1"


@dataclass(frozen=True)
class StepConfig(Config):
    eps: float = option(0.1, "a field that clashes with the model's step size", gt=0)


class ClashingEstimator:
    Config = StepConfig


@pytest.mark.parametrize("vary, message", [
    (["eps=0.1"], "ambiguous: both the model and clash have 'eps'"),
    (["betta=0.1"], "did you mean 'beta'"),
    (["beta=-1"], "beta: -1.0 is out of range"),
    (["s=1,1"], "repeated values"),
    (["s"], "expected KEY=v1,v2"),
    (["foo.s=1"], "neither 'model' nor an estimator"),
    (["s=1", "model.s=2"], "varied twice"),
])
def test_bad_keys_and_values_are_errors_before_anything_runs(vary, message):
    with pytest.raises(ConfigError, match=message):
        resolve_axes(vary, CET, {"ep": EP, "clash": ClashingEstimator})


def test_scoped_key_disambiguates():
    (axis,) = resolve_axes(["clash.eps=0.1,0.2"], CET, {"clash": ClashingEstimator})
    assert axis.owners == ("clash",)
    assert parse_vary("T1=1, 2") == ("T1", ("1", "2"))


def test_on_cuda_grid_points_differing_only_in_stacked_knobs_run_together():
    from ep_core.models.lm import LM
    from ep_core.models.toy import Toy
    from ep_core.sweep import _stacked_axes, _units

    estimators = {"ep": EP, "aep": AEP}
    axes = resolve_axes(["s=0.5,1", "beta=0.1,0.2", "T1=30,40", "T2=5,10"], LM, estimators)
    assert _stacked_axes(axes, LM, estimators, "cuda", eager=False) == {"s", "beta"}      # not T1, not T2
    assert (_stacked_axes(axes, LM, estimators, "cuda:1", eager=True)
            == _stacked_axes(axes, LM, estimators, "cpu", eager=False) == set())
    toy_axes = resolve_axes(["model.coupling=0.2,0.5"], Toy, {"ep": EP})
    assert _stacked_axes(toy_axes, Toy, {"ep": EP}, "cuda", eager=False) == set()
    from ep_core.bptt import BPTT
    from epx_estimators.adjoint import Adjoint
    mixed = {"ep": EP, "adjoint": Adjoint, "bptt": BPTT}
    assert "T1" not in _stacked_axes(resolve_axes(["T1=30,40"], LM, mixed), LM, mixed, "cuda", eager=False)
    # ε stacks where every estimator, the reference included, scales with the force: adjoint does not declare it.
    step_axes = resolve_axes(["eps=0.05,0.1"], LM, {**estimators, "bptt": BPTT})
    assert _stacked_axes(step_axes, LM, {**estimators, "bptt": BPTT}, "cuda", eager=False) == {"eps"}
    assert _stacked_axes(resolve_axes(["eps=0.05,0.1"], LM, mixed), LM, mixed, "cuda", eager=False) == set()
    points = grid(axes, seeds=(0, 1))
    units = _units(points, {"s", "beta"})
    assert len(units) == 4 and sorted(i for unit in units for i in unit) == list(range(len(points)))
    for unit in units:
        assert len(unit) == 8 and {points[i].values["s"] for i in unit} == {"0.5", "1"}
        assert len({(points[i].values["T1"], points[i].values["T2"]) for i in unit}) == 1
    assert [len(unit) for unit in _units(points, set())] == [2] * 16            # each point's seeds


def test_problems_at_different_knobs_measured_together_are_each_their_own_comparison():
    from ep_core.session import run_comparison, run_problem_comparisons

    registry = load()
    problems = [({"T2": "30", "beta": beta}, {**SMALL_CET, "s": s}, seed)
                for s, beta in (("0.5", "0.02"), ("2", "0.01")) for seed in (0, 1)]
    together = run_problem_comparisons(registry, ["ep", "aep"], "cet", problems=problems, data="sample",
                                       batch_size=4, repeats=1)
    for (settings, model_settings, seed), comparison in zip(problems, together):
        alone = run_comparison(registry, ["ep", "aep"], "cet", model_settings=model_settings, seed=seed,
                               data="sample", batch_size=4, settings=settings, repeats=1)
        assert comparison.meta["group"]["size"] == 4 and comparison.meta["model"]["config"]["s"] == float(
            model_settings["s"])
        assert [r.metrics for r in comparison.results] == [r.metrics for r in alone.results]
    assert together[0].results[2].metrics["cosine"] != together[2].results[2].metrics["cosine"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_sweep_over_s_beta_and_eps_measures_its_grid_points_together_with_their_own_numbers():
    spec = SweepSpec(estimators=("ep", "aep"), model="lm", vary=("s=0.25,1", "beta=0.01,0.03", "eps=0.05,0.1"),
                     seeds=(0, 1), data="sample", batch_size=4, device="cuda",
                     model_settings={"context": "12", "width": "16", "heads": "2", "T1": "40"})
    together = run_sweep(load(), spec)
    apart = run_sweep(load(), spec, eager=True)
    for joint, alone in zip(together.records, apart.records):
        assert joint["id"] == alone["id"] and joint["status"] == alone["status"] == "ok"
        assert joint["comparison"]["group"]["size"] == 16 and alone["comparison"]["group"]["size"] == 2
        for mine, theirs in zip(joint["comparison"]["results"], alone["comparison"]["results"]):
            assert mine["execution"] in ("captured", "stacked") and theirs["execution"] == "eager"
            assert mine["metrics"]["cosine"] == pytest.approx(theirs["metrics"]["cosine"], abs=1e-5)
            assert mine["metrics"]["rel_error"] == pytest.approx(theirs["metrics"]["rel_error"], abs=1e-5)


def _toy_spec(**changes):
    base = dict(estimators=("ep", "aep"), model="toy", vary=("model.coupling=0.2,0.5", "beta=0.01,0.001"),
                seeds=(0, 1), settings={"T2": "100"}, model_settings={"conservative": "false"})
    return SweepSpec(**{**base, **changes})


def _without_timings(record):
    """What must be identical between runs: everything but wall-clock times and the environment."""
    if record["status"] != "ok":
        return record
    comparison = {k: v for k, v in record["comparison"].items() if k not in ("environment", "group")}
    comparison["results"] = [{k: v for k, v in r.items() if k not in ("ms", "ms_median", "shared_measurement")}
                             for r in comparison["results"]]
    return {**record, "comparison": comparison}


def test_an_estimate_that_is_the_same_computation_at_several_grid_points_is_measured_once(monkeypatch):
    """β and T2 do not change bptt's problem, nor does aep.T2 ep's: bptt is measured once per seed and coupling, ep
    once per seed, coupling and β; their rows say so, and every record equals the one of a point run alone."""
    from ep_core.bptt import BPTT

    estimated = {"bptt": 0, "ep": 0}
    originals = {"bptt": BPTT.estimate, "ep": EP.estimate}

    def counting(name):
        def counted(self, model, batch, **kwargs):
            estimated[name] += 1
            return originals[name](self, model, batch, **kwargs)
        return counted
    monkeypatch.setattr(BPTT, "estimate", counting("bptt"))
    monkeypatch.setattr(EP, "estimate", counting("ep"))
    spec = _toy_spec(vary=("model.coupling=0.2,0.5", "beta=0.01,0.001", "aep.T2=50,100"), settings={},
                     repeats=2)
    sweep = run_sweep(load(), spec)
    runs_per_measurement = 1 + 2  # the counted first estimate and the timed ones (warm-up 1)
    assert len(sweep.records) == 16
    assert estimated == {"bptt": 2 * 2 * runs_per_measurement, "ep": 2 * 2 * 2 * runs_per_measurement}

    def shared(label):
        return [next(r for r in record["comparison"]["results"] if r["label"] == label)["shared_measurement"]
                for record in sweep.records]
    assert shared("bptt") == [False, False] + [True] * 6 + [False, False] + [True] * 6
    assert shared("ep") == [False, False, True, True] * 4        # the second aep.T2 of each β
    assert not any(shared("aep"))
    for record in sweep.records[2:8]:
        first = sweep.records[record["seed"]]["comparison"]["results"][0]
        assert record["comparison"]["results"][0]["ms"] == first["ms"]
    alone = run_sweep(load(), _toy_spec(vary=("model.coupling=0.5",), settings={"beta": "0.001", "aep.T2": "100"},
                                        repeats=2))
    by_id = {(r["values"]["model.coupling"], r["seed"]): r for r in sweep.records
             if r["values"]["beta"] == "0.001" and r["values"]["aep.T2"] == "100"}
    for record in alone.records:
        mine = by_id[(record["values"]["model.coupling"], record["seed"])]
        assert [r["metrics"] for r in mine["comparison"]["results"]] == [
            r["metrics"] for r in record["comparison"]["results"]]


def test_a_problem_whose_model_or_batch_differs_is_not_taken_for_a_known_one():
    from ep_core.harness import MeasurementCache, _Problem
    from ep_core.bptt import BPTT
    from ep_core.models.toy import Toy, ToyConfig

    def toy(seed):
        return Toy(ToyConfig(), generator=torch.Generator().manual_seed(seed))
    model = toy(0)
    batch = model.make_batch(3, generator=torch.Generator().manual_seed(1))
    cache = MeasurementCache(size=2)
    cache.add(_Problem.of(BPTT(), model, batch, seed=0), "measured")
    assert cache.find(_Problem.of(BPTT(), toy(0), dict(batch), seed=0)) == "measured"
    assert cache.find(_Problem.of(BPTT(), toy(1), batch, seed=0)) is None                  # other parameters
    assert cache.find(_Problem.of(BPTT(), model, {**batch, "inputs": batch["inputs"] + 1e-6}, seed=0)) is None
    assert cache.find(_Problem.of(BPTT(), model, batch, seed=1)) is None
    assert cache.find(_Problem.of(BPTT(), toy(0).double(), {k: v.double() if v.is_floating_point() else v
                                                             for k, v in batch.items()}, seed=0)) is None
    with torch.no_grad():
        next(model.parameters()).add_(1.0)                                              # changed in place
    assert cache.find(_Problem.of(BPTT(), model, batch, seed=0)) is None
    cache.add(_Problem.of(BPTT(), toy(2), batch, seed=0), "second")
    cache.add(_Problem.of(BPTT(), toy(3), batch, seed=0), "third")
    assert cache.find(_Problem.of(BPTT(), toy(0), batch, seed=0)) is None                   # only the last 2 kept


def test_interrupted_sweep_resumes_and_matches_an_uninterrupted_one(tmp_path):
    registry = load()
    spec = _toy_spec()
    whole = run_sweep(registry, spec, out=tmp_path / "whole.json")
    assert len(whole.records) == 8 and all(r["status"] == "ok" for r in whole.records)

    partial = tmp_path / "partial.json"

    def interrupt_at_third_point(index, total, point):
        if index == 4:  # a point's two seeds run together: points 0 and 1 are done, 4 records
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(registry, spec, out=partial, on_point=interrupt_at_third_point)
    assert len(json.loads(partial.read_text())["records"]) == 4

    resumed = run_sweep(registry, spec, out=partial)
    assert resumed.resumed == 4
    saved = json.loads(partial.read_text())["records"]
    assert [r["id"] for r in saved] == [r["id"] for r in whole.records]
    assert [_without_timings(r) for r in saved] == [_without_timings(r) for r in whole.records]

    with pytest.raises(SweepMismatch, match="seeds"):
        run_sweep(registry, _toy_spec(seeds=(0,)), out=partial)


def test_summary_pools_seeds_and_the_aep_gain_is_visible():
    sweep = run_sweep(load(), _toy_spec(vary=("model.coupling=0.6",), settings={"T2": "100", "beta": "0.001"},
                                        seeds=(0, 1, 2)))
    (row,) = summarize(sweep.to_json(), group="coupling")
    assert row["seeds"] == row["seeds_run"] == 3 and row["failed_seeds"] == row["errors"] == []
    aep_mean, aep_std = row["estimators"]["aep"]["group_cosine"]
    ep_mean, _ = row["estimators"]["ep"]["group_cosine"]
    assert aep_mean > 0.999 and aep_std < 1e-3 and ep_mean < aep_mean
    assert row["fixed_point_distance"] == 0.0


def test_summary_counts_the_seeds_that_failed():
    def record(seed, status):
        base = {"id": str(seed), "values": {"s": "1"}, "seed": seed, "status": status}
        if status == "failed":
            return base | {"error": f"diverged (seed {seed})"}
        results = [{"label": label, "residual": 1e-5, "converged": True, "ms_median": 3.0, "fixed_point_distance": {},
                    "metrics": {"cosine": cosine, "groups": {}}} for label, cosine in (("bptt", 1.0), ("aep", 0.9))]
        return base | {"comparison": {"reference": "bptt", "results": results}}

    (row,) = summarize({"records": [record(0, "ok"), record(1, "failed"), record(2, "ok"), record(3, "failed")]})
    assert (row["seeds"], row["seeds_run"]) == (2, 4)
    assert row["failed_seeds"] == [1, 3] and row["errors"] == ["diverged (seed 1)", "diverged (seed 3)"]
    assert row["estimators"]["aep"]["cosine"] == pytest.approx((0.9, 0.0)) and row["converged"] is True


def test_a_diverging_point_is_recorded_and_the_sweep_goes_on():
    spec = SweepSpec(estimators=("aep",), model="cet", vary=("eps=0.2,5",), data="sample", batch_size=4,
                     model_settings=SMALL_CET)
    sweep = run_sweep(load(), spec)
    ok, failed = sweep.records
    assert ok["status"] == "ok" and ok["comparison"]["results"][1]["metrics"]["cosine"] > 0.9
    assert failed["status"] == "failed" and "diverged at step" in failed["error"] and "eps=5" in failed["error"]


def _sweep_command(out, *extra):
    args = ["sweep", "ep", "aep", "--model", "cet", "--data", "sample", "--batch-size", "4", "--vary",
            "s=0,0.5,1,2,4,6", "--group", "attention", "--out", str(out)]
    for key, value in SMALL_CET.items():
        args += ["--model-set", f"{key}={value}"]
    return args + list(extra)


def test_sweep_killed_with_sigkill_resumes_with_every_point_once(tmp_path):
    killed, whole = tmp_path / "killed.json", tmp_path / "whole.json"
    command = [sys.executable, "-m", "epx_cli", *_sweep_command(killed, "--repeats", "3")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if killed.exists() and len(json.loads(killed.read_text())["records"]) >= 2:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = len(json.loads(killed.read_text())["records"])
    assert 2 <= finished_before < 6, "the sweep should have been killed half way"

    runner = CliRunner()
    resumed = runner.invoke(cli_main.cli, _sweep_command(killed, "--repeats", "3"), catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resumed: {finished_before} point(s)" in resumed.stderr
    uninterrupted = runner.invoke(cli_main.cli, _sweep_command(whole, "--repeats", "3"), catch_exceptions=False)
    assert uninterrupted.exit_code == 0
    after = json.loads(killed.read_text())["records"]
    reference = json.loads(whole.read_text())["records"]
    assert sorted(r["id"] for r in after) == sorted({r["id"] for r in after})
    assert [r["id"] for r in after] == [r["id"] for r in reference]
    assert [_without_timings(r) for r in after] == [_without_timings(r) for r in reference]


def test_cli_table_json_and_plot(tmp_path):
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    runner = CliRunner()
    result = runner.invoke(cli_main.cli, _sweep_command(out, "--plot", str(plot), "--json"),
                           catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == json.loads(out.read_text())
    assert [r["values"]["s"] for r in data["records"]] == ["0", "0.5", "1", "2", "4", "6"]
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    table = runner.invoke(cli_main.cli, _sweep_command(out), catch_exceptions=False)
    assert "aep cos" in table.stdout and "attention" in table.stdout and "resumed: 6 point(s)" in table.stderr
    seeds = re.findall(r"│ +(\d/1) │", table.stdout)
    assert seeds and len(seeds) % 6 == 0 and set(seeds) <= {"0/1", "1/1"}
    assert ("0/1" in seeds) == ("failed runs: " in table.stdout)


def test_plot_without_matplotlib_exits_2_with_the_install_hint(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = CliRunner().invoke(cli_main.cli, _sweep_command(tmp_path / "x.json", "--plot", str(tmp_path / "x.png")))
    assert result.exit_code == 2
    assert "pip install 'epx[plot]'" in result.stderr
    assert not (tmp_path / "x.json").exists()


def test_unknown_group_and_mismatched_file_are_usage_errors(tmp_path):
    runner = CliRunner()
    bad_group = runner.invoke(cli_main.cli, ["sweep", "aep", "--model", "toy", "--vary", "beta=0.1",
                                             "--group", "attention"])
    assert bad_group.exit_code == 2 and "no parameter group 'attention'" in bad_group.stderr
    out = tmp_path / "t.json"
    first = runner.invoke(cli_main.cli, ["sweep", "aep", "--model", "toy", "--vary", "beta=0.1", "--out", str(out)])
    assert first.exit_code == 0
    other = runner.invoke(cli_main.cli, ["sweep", "aep", "--model", "toy", "--vary", "beta=0.2", "--out", str(out)])
    assert other.exit_code == 2 and "holds a different sweep" in other.stderr


def test_a_log_axis_labels_exactly_the_swept_values(tmp_path, monkeypatch):
    import epx_cli.plot as plot

    values = ["0.25", "0.5", "1", "2", "4", "8"]
    rows = [{"values": {"s": v}, "seeds": 1, "residual": (1e-5, 0.0),
             "estimators": {label: {"cosine": (c, 0.0), "group_cosine": None, "ms": (5.0, 0.0)}
                            for label, c in (("bptt", 1.0), ("aep", 0.99))}} for v in values]
    sweep = {"spec": {"model": "cet", "reference": "bptt", "model_settings": {}, "settings": {}},
             "axes": [{"key": "s", "owners": ["model"], "values": values}]}
    figures = []
    monkeypatch.setattr(plot, "save_png", lambda fig, path: figures.append(fig))
    plot.plot_sweep(sweep, rows, tmp_path / "s.png", group=None, panel="ms")
    (figure,) = figures
    figure.canvas.draw()
    axis = figure.axes[-1]
    assert axis.get_xscale() == "log"
    labels = [t.get_text() for t in axis.xaxis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
    assert labels == values


def test_ctrl_c_prints_the_command_that_resumes_the_sweep(tmp_path, interrupt_epx):
    out = tmp_path / "my sweep.json"  # a space: the printed command must quote it
    arguments = _sweep_command(out, "--repeats", "3")
    command = interrupt_epx(arguments, lambda: out.exists() and len(json.loads(out.read_text())["records"]) >= 2)
    assert command == ["epx", *arguments]
    finished = len(json.loads(out.read_text())["records"])
    assert 2 <= finished < 6, "the sweep should have been stopped half way"

    resumed = CliRunner().invoke(cli_main.cli, command[1:], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resumed: {finished} point(s)" in resumed.stderr
    assert len(json.loads(out.read_text())["records"]) == 6


def test_the_sweep_names_the_runs_whose_phases_did_not_reach_the_solvers_tolerance(tmp_path):
    command = ["sweep", "ep", "--model", "toy", "--dtype", "float64", "--model-set", "solver=anderson",
               "--model-set", "tol=1e-10", "--vary", "beta=0.001,0.002", "--repeats", "1"]
    runner = CliRunner()
    short = runner.invoke(cli_main.cli, [*command, "--set", "T2=3", "--out", str(tmp_path / "short.json")],
                          catch_exceptions=False)
    assert short.exit_code == 0, short.stderr
    assert ("tolerance NOT reached (tol = 1e-10) at beta=0.001, seed 0: ep (2 nudged phases) stopped on their bound "
            "of evaluations (T1, T2) or where the residual stopped falling (and in 1 more run)") in " ".join(
                short.stdout.split())
    long = runner.invoke(cli_main.cli, [*command, "--set", "T2=300", "--out", str(tmp_path / "long.json")],
                         catch_exceptions=False)
    assert long.exit_code == 0, long.stderr
    assert "tolerance NOT reached" not in long.stdout
