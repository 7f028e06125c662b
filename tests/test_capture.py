"""Captured estimates (ep_core.capture): on CUDA a replayed graph gives the eager numbers, sees in-place parameter
updates, is captured again when a parameter is replaced, reports divergence with its exact step and keeps memory
flat in T1; on the CPU the runner is the eager estimate itself. The CUDA tests are skipped without a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from epx_estimators.adjoint import Adjoint, AdjointConfig
from epx_estimators.aep import AEP, AEPConfig
from epx_estimators.ep import EP

from ep_core.bptt import BPTT
from ep_core.capture import DeviceScalar, Runner, capturing, finite, report
from ep_core.harness import gradient_metrics, measure
from ep_core.models.cet import CET, CETConfig
from ep_core.models.lm import LM, LMConfig
from ep_core.protocols import DivergenceError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ESTIMATORS = {"ep": EP(), "aep": AEP(AEPConfig(clip=1.0)), "adjoint": Adjoint(), "bptt": BPTT()}


def lm(device: str = "cpu", dtype=torch.float32, **settings) -> tuple[LM, dict]:
    model = LM(LMConfig(**{"vocab": 11, "context": 12, "width": 16, "heads": 2, "T1": 40, **settings}),
               generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    return model, lm_batch(model, 1)


def lm_batch(model: LM, seed: int) -> dict:
    tokens = torch.randint(0, 11, (3, 13), generator=torch.Generator().manual_seed(seed))
    return model.prepare_batch(tokens[:, :-1], tokens[:, 1:], generator=torch.Generator())


def cet(device: str) -> tuple[CET, dict]:
    model = CET(CETConfig(dim=16, heads=2, head_dim=8, memories=16, T1=40),
                generator=torch.Generator().manual_seed(0)).to(device)
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    batch = model.prepare_batch(images, torch.zeros(4), generator=torch.Generator().manual_seed(2))
    return model, {k: v.to(device) for k, v in batch.items()}


def agree(a, b, tol: float) -> None:
    assert a.grads.keys() == b.grads.keys()
    for name in a.grads:
        scale = float(b.grads[name].abs().max()) or 1.0
        assert float((a.grads[name] - b.grads[name]).abs().max()) <= tol * scale, name


@pytest.mark.parametrize("label", list(ESTIMATORS))
def test_on_the_cpu_the_runner_is_the_eager_estimate(label):
    model, batch = lm(dtype=torch.float64)
    estimator = ESTIMATORS[label]
    runner = Runner((estimator, model))
    assert not runner.capture_wanted()
    ran = runner(batch, generator=torch.Generator())
    direct = estimator.estimate(model, batch, generator=torch.Generator())
    assert runner.mode == "eager"
    agree(ran, direct, 1e-12)
    assert isinstance(ran.equilibrium.residual, float)


def test_outside_a_capture_finite_and_report_read_the_value():
    assert not capturing()
    assert finite(torch.tensor(3.0)) and not finite(torch.tensor(float("nan")))
    assert report(torch.tensor(0.25)) == 0.25 and isinstance(report(torch.tensor(0.25)), float)
    assert float(DeviceScalar(torch.tensor(2.0))) == 2.0


def test_estimators_with_data_dependent_work_are_not_captured():
    """Anderson and GMRES stop on a tolerance: their work depends on the data, which a graph cannot."""
    model, _ = lm(solver="anderson")
    assert not EP().capturable(model) and not AEP().capturable(model)
    plain, _ = lm()
    assert EP().capturable(plain) and Adjoint().capturable(plain)
    assert not Adjoint(AdjointConfig(solver="gmres")).capturable(plain)
    assert BPTT().capturable(model)


@cuda
@pytest.mark.parametrize("make", [lm, cet], ids=["lm", "cet"])
@pytest.mark.parametrize("label", list(ESTIMATORS))
def test_a_captured_estimate_gives_the_eager_numbers(make, label):
    model, batch = make("cuda")
    estimator = ESTIMATORS[label]
    runner = Runner((estimator, model))
    eager = Runner((estimator, model), eager=True)(batch, generator=torch.Generator("cuda"))
    first = runner(batch, generator=torch.Generator("cuda"))
    again = runner(batch, generator=torch.Generator("cuda"))
    assert runner.mode == "captured"
    assert all(torch.equal(first.grads[n], again.grads[n]) for n in first.grads)
    assert gradient_metrics(first.grads, eager.grads, model.parameter_groups())["cosine"] >= 1 - 1e-5
    agree(first, eager, 1e-4)
    assert isinstance(first.equilibrium.residual, float)
    assert first.equilibrium.residual == pytest.approx(eager.equilibrium.residual, rel=1e-3, abs=1e-7)
    if label == "adjoint":
        assert first.stats.adjoint_residual == pytest.approx(eager.stats.adjoint_residual, rel=1e-2, abs=1e-7)


@cuda
def test_a_replay_reads_new_batches_updated_parameters_and_recaptures_replaced_ones():
    model, batch = lm("cuda")
    runner = Runner((AEP(), model))
    runner(batch, generator=torch.Generator("cuda"))

    def eager(b):
        return Runner((AEP(), model), eager=True)(b, generator=torch.Generator("cuda"))

    other = lm_batch(model, 7)
    agree(runner(other, generator=torch.Generator("cuda")), eager(other), 1e-4)
    with torch.no_grad():
        model.W_V.mul_(1.5)                  # in place, as an optimizer step: the graph reads the new values
    agree(runner(other, generator=torch.Generator("cuda")), eager(other), 1e-4)
    model.W_O = torch.nn.Parameter(model.W_O.detach() * 0.5)   # a new tensor: captured again
    agree(runner(other, generator=torch.Generator("cuda")), eager(other), 1e-4)
    assert runner.mode == "captured" and len(runner._graphs) == 2


def _first_nonfinite_step(model, batch) -> int:
    from ep_core.relax import relaxation_map
    G = relaxation_map(model, batch)
    with torch.no_grad():
        x = model.init_state(batch)
        for t in range(1, 10_000):
            x = G(x)
            if not all(torch.isfinite(xi).all() for xi in x):
                return t
    raise AssertionError("did not diverge")


@cuda
@pytest.mark.parametrize("label", ["ep", "adjoint", "bptt"])
def test_a_replay_that_diverges_reports_the_exact_step(label):
    """Captured on a stable model, then its attention made explosive in place: the replay's flags are not finite,
    and the eager re-run names the first non-finite step."""
    model, batch = lm("cuda", gain_bound=None)
    runner = Runner((ESTIMATORS[label], model))
    runner(batch, generator=torch.Generator("cuda"))
    assert runner.mode == "captured"
    with torch.no_grad():
        model.W_V.mul_(1e3)
    with pytest.raises(DivergenceError) as info:
        runner(batch, generator=torch.Generator("cuda"))
    assert info.value.phase == "free" and info.value.step == _first_nonfinite_step(model, batch) < model.config.T1


@cuda
@pytest.mark.parametrize("label", ["ep", "bptt"])
def test_problems_side_by_side_check_finiteness_each_on_its_own_stream(label):
    """Eight problems on eight streams of one graph: no member reads a finiteness flag another stream writes (a
    race that made replays look non-finite and run again eagerly), and a diverging member is still caught."""
    pairs = [lm("cuda", gain_bound=None) for _ in range(8)]
    models = [model for model, _ in pairs]
    batches = [lm_batch(model, seed) for seed, model in enumerate(models)]
    runner = Runner([(ESTIMATORS[label], model) for model in models], stacking=False)

    def run():
        return runner.run(batches, [torch.Generator("cuda") for _ in models])

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        first = run()
        for _ in range(10):
            again = run()
            assert runner.mode == "captured"
            assert all(torch.equal(a.grads[n], b.grads[n]) for a, b in zip(first, again) for n in a.grads)
    with torch.no_grad():
        models[5].W_V.mul_(1e3)
    for _ in range(3):
        with pytest.raises(DivergenceError) as info:
            run()
        assert info.value.step == _first_nonfinite_step(models[5], batches[5])


@cuda
@pytest.mark.parametrize("label", ["ep", "aep", "adjoint"])
def test_captured_memory_stays_flat_in_T1(label):
    peaks = []
    for T1 in (100, 1000):
        model, batch = lm("cuda", T1=T1)
        measurement = measure(ESTIMATORS[label], model, batch, seed=0, repeats=1)
        assert measurement.mode == "captured"
        peaks.append(measurement.peak_memory_bytes)
    assert peaks[1] <= 1.2 * peaks[0], peaks


def test_seeds_measured_together_give_each_seeds_own_comparison():
    """run_comparisons over three seeds: each comparison is the one its seed gives alone (eager on the CPU, so
    exactly), and says how many problems its times cover."""
    from ep_core.plugins import load
    from ep_core.session import run_comparison, run_comparisons

    registry = load()
    settings = {"T2": "60"}
    together = run_comparisons(registry, ["ep", "aep"], "toy", seeds=[3, 4, 5], settings=settings, repeats=1)
    for seed, comparison in zip([3, 4, 5], together):
        alone = run_comparison(registry, ["ep", "aep"], "toy", seed=seed, settings=settings, repeats=1)
        assert comparison.meta["seed"] == seed and comparison.meta["group"]["size"] == 3
        for a, b in zip(comparison.results, alone.results):
            assert a.label == b.label and a.metrics == b.metrics and a.residual == b.residual
            assert a.force_evals == b.force_evals and a.execution == "eager"
    assert together[0].results[1].metrics["cosine"] != together[1].results[1].metrics["cosine"]


def test_compare_seeds_prints_every_seed_and_writes_every_comparison(tmp_path):
    import json

    from click.testing import CliRunner

    from epx_cli.main import cli

    out = tmp_path / "seeds.json"
    result = CliRunner().invoke(cli, ["compare", "ep", "--model", "toy", "--seed", "2", "--seeds", "3",
                                      "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["format"] == "epx.comparisons/1" and data["seeds"] == [2, 3, 4]
    assert [c["seed"] for c in data["comparisons"]] == [2, 3, 4]
    for seed, comparison in zip(data["seeds"], data["comparisons"]):
        cosine = comparison["results"][1]["metrics"]["cosine"]
        assert f"{cosine:.5f}" in next(line for line in result.output.splitlines() if line.strip(" │|").startswith(
            f"{seed} "))
    assert "seeds 2–4" in result.output and "mean" in result.output
    too_far = CliRunner().invoke(cli, ["compare", "ep", "--model", "toy", "--seed", str(2**32 - 2), "--seeds", "3"])
    assert too_far.exit_code == 2 and "--seed/--seeds" in too_far.output
