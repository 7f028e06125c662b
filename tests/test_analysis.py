"""ep_core.analysis and `epx analyze`: the antisymmetry measure, the spectral radius of J_G, the verdicts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ep_core import analysis
from ep_core.analysis import antisymmetry, diagnose_fixed_point, spectral_radius
from ep_core.models.cet import CET, CETConfig
from ep_core.models.toy import Toy, ToyConfig
from ep_core.protocols import Batch, Dynamics, State
from ep_core.relax import free_phase, linearize, relaxation_map
from ep_core.session import build_batch, generator, load_data
from epx_cli import main as cli_main
from epx_cli.analyze import analyze

SMALL_CET = {"dim": 16, "heads": 2, "head_dim": 8, "memories": 16}


class Linear(nn.Module):
    """F(x) = (x − x*)Mᵀ on each row of x (B×n): J = M everywhere, J_G = I + εM, fixed point x*."""

    config = None
    data = "synthetic"

    def __init__(self, M: torch.Tensor, x_star: torch.Tensor, start: torch.Tensor, *, eps: float, T1: int):
        super().__init__()
        self.M = nn.Parameter(M)
        self.x_star, self.start, self.eps, self.T1 = x_star, start, eps, T1

    @classmethod
    def with_relaxation_map(cls, J_G: torch.Tensor, *, x_star: torch.Tensor, start: torch.Tensor,
                            eps: float = 0.1, T1: int = 50) -> Linear:
        return cls((J_G - torch.eye(J_G.shape[0], dtype=J_G.dtype)) / eps, x_star, start, eps=eps, T1=T1)

    @property
    def dynamics(self) -> Dynamics:
        return Dynamics(eps=self.eps, T1=self.T1)

    def init_state(self, batch: Batch) -> State:
        return (self.start.clone(),)

    def force(self, state: State, batch: Batch) -> State:
        (x,) = state
        return ((x - self.x_star) @ self.M.T,)

    def project(self, state: State) -> State:
        return state

    def cost(self, state: State, batch: Batch) -> torch.Tensor:
        return 0.5 * state[0].pow(2).sum()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat_jacobian(model, batch: Batch, state: State) -> torch.Tensor:
    """Dense J_G at ``state`` (one-part states), by torch.func.jacrev."""
    (x,) = state
    G = relaxation_map(model, batch)
    return torch.func.jacrev(lambda v: G((v.view_as(x),))[0].reshape(-1))(x.reshape(-1)).detach()


def toy(**settings) -> tuple[Toy, Batch]:
    model = Toy(ToyConfig.from_mapping(settings), generator=generator(0, 0)).double()
    return model, build_batch(model, None, batch_size=2).batch


def small_cet(**settings) -> tuple[CET, Batch]:
    from ep_core.plugins import load

    model = CET(CETConfig.from_mapping({**SMALL_CET, **settings}), generator=generator(0, 0))
    return model, build_batch(model, load_data(load(), "sample", spec=CET.data), batch_size=4, requested="sample").batch


# --- antisymmetry ------------------------------------------------------------------------------------

def test_antisymmetry_of_a_linear_force_is_exactly_that_of_its_matrix():
    g = seeded(3)
    n, rows = 5, 3
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    S = -(B @ B.T + 0.5 * torch.eye(n, dtype=torch.float64))  # symmetric negative definite
    C = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = C - C.T
    x_star = torch.randn(rows, n, generator=g, dtype=torch.float64)
    model = Linear(S + A, x_star, torch.zeros(rows, n, dtype=torch.float64), eps=0.05, T1=20)

    result = antisymmetry(model, {}, samples=6, generator=seeded(11))

    # The directions, drawn as documented: N(0, I) in float32 from the generator, part by part.
    again = seeded(11)
    directions = [torch.randn(rows, n, generator=again).double() for _ in range(6)]
    expected = [float(torch.linalg.vector_norm(v @ A.T) / torch.linalg.vector_norm(v @ (S + A).T))
                for v in directions]
    assert list(result["parts"]) == ["x0"]
    assert result["parts"]["x0"]["values"] == pytest.approx(expected, abs=1e-10, rel=0)
    assert result["whole"]["values"] == pytest.approx(expected, abs=1e-10, rel=0)
    assert result["whole"]["mean"] == pytest.approx(sum(expected) / 6, abs=1e-10, rel=0)
    assert result["samples"] == 6 and result["T1"] == 20


def test_antisymmetry_is_zero_for_gradient_fields():
    conservative = Toy(ToyConfig(), generator=generator(0, 0))
    batch = build_batch(conservative, None, batch_size=8).batch
    assert antisymmetry(conservative, batch, generator=seeded())["whole"]["mean"] < 1e-6
    cet, cet_batch = small_cet(s=0)
    result = antisymmetry(cet, cet_batch, generator=seeded())
    assert result["whole"]["mean"] < 1e-6
    assert all(part["mean"] < 1e-6 for part in result["parts"].values())


def test_antisymmetry_grows_with_s_and_lives_in_the_token_part():
    means, tokens, reconstruction = [], [], []
    for s in (0.5, 1.0, 2.0):
        cet, batch = small_cet(s=s)
        result = antisymmetry(cet, batch, generator=seeded())
        z, y = result["parts"].values()  # the state is (tokens z, reconstruction y)
        means.append(result["whole"]["mean"])
        tokens.append(z["mean"])
        reconstruction.append(y["mean"])
    assert 0 < means[0] < means[1] < means[2]
    assert tokens[0] < tokens[1] < tokens[2]
    assert reconstruction == [0.0, 0.0, 0.0]  # attention acts on z only: F_y's rows of J stay symmetric


def test_antisymmetry_is_deterministic_and_names_parts():
    cet, batch = small_cet(s=1)
    first = antisymmetry(cet, batch, samples=3, generator=seeded(5))
    assert antisymmetry(cet, batch, samples=3, generator=seeded(5)) == first
    names = getattr(cet, "state_names", ("x0", "x1"))
    assert list(first["parts"]) == list(names)


def test_antisymmetry_needs_two_samples():
    from ep_core.config import ConfigError

    model, batch = toy()
    with pytest.raises(ConfigError, match="samples: needs at least 2"):
        antisymmetry(model, batch, samples=1, generator=seeded())


# --- spectral radius ---------------------------------------------------------------------------------

def dense_radius(J: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(J).abs().max())


@pytest.mark.parametrize("settings, iterations", [
    ({}, 50),                                          # 12 states: the Krylov space fills up
    ({"conservative": False}, 50),
    ({"units": 40, "conservative": False}, 40),         # 80 states: a true estimate
])
def test_spectral_radius_matches_dense_eigenvalues_on_toy(settings, iterations):
    model, batch = toy(**settings)
    x_star = free_phase(model, batch).state
    _, J_G_transpose = linearize(relaxation_map(model, batch), x_star)
    estimate = spectral_radius(J_G_transpose, x_star, iterations=iterations, generator=seeded())
    assert estimate["rho"] == pytest.approx(dense_radius(flat_jacobian(model, batch, x_star)), abs=1e-3)
    assert estimate["applications"] <= iterations
    assert estimate["ritz_residual"] < 1e-3


def test_spectral_radius_resolves_a_complex_dominant_pair():
    g = seeded(1)
    n, radius, angle = 60, 0.95, 0.6
    D = torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 1.2 - 0.6)
    c, s = math.cos(angle), math.sin(angle)
    D[:2, :2] = radius * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    P = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    J_G = P @ D @ torch.linalg.inv(P)  # not normal: the Ritz values must still find the pair
    model = Linear.with_relaxation_map(J_G, x_star=torch.ones(1, n, dtype=torch.float64),
                                       start=torch.zeros(1, n, dtype=torch.float64))
    x = model.init_state({})
    assert torch.allclose(flat_jacobian(model, {}, x), J_G, atol=1e-12)
    _, J_G_transpose = linearize(relaxation_map(model, {}), x)
    estimate = spectral_radius(J_G_transpose, x, iterations=40, generator=seeded())
    assert estimate["rho"] == pytest.approx(dense_radius(J_G), abs=1e-3)
    assert abs(estimate["ritz"]["imag"]) == pytest.approx(radius * math.sin(angle), abs=1e-3)
    assert estimate["applications"] == 40


# --- fixed-point verdicts -----------------------------------------------------------------------------

def linear_with(diagonal: list[float], offset: list[float], *, T1: int) -> Linear:
    """J_G = diag(...) in a random orthonormal basis, starting at x* + offset."""
    n = len(diagonal)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=seeded(2), dtype=torch.float64))
    J_G = Q @ torch.diag(torch.tensor(diagonal, dtype=torch.float64)) @ Q.T
    x_star = torch.full((1, n), 5.0, dtype=torch.float64)
    start = x_star + torch.tensor([offset], dtype=torch.float64) @ Q.T
    return Linear.with_relaxation_map(J_G, x_star=x_star, start=start, T1=T1)


def test_verdict_converged_on_toy():
    model, batch = toy()
    diagnosis = diagnose_fixed_point(model, batch, generator=seeded())
    assert diagnosis["verdict"] == analysis.CONVERGED
    assert diagnosis["residual_T"] < 1e-10 and diagnosis["spectral"]["rho"] < 1
    assert diagnosis["T1"] == 300 and diagnosis["T1_estimate"] is None


def test_verdict_still_contracting_on_cet_with_few_steps():
    cet, batch = small_cet(s=1, T1=5)
    diagnosis = diagnose_fixed_point(cet, batch, generator=seeded())
    assert diagnosis["verdict"] == analysis.CONTRACTING
    assert diagnosis["residual_2T"] < diagnosis["residual_T"]
    assert diagnosis["spectral"]["rho"] < 1 and diagnosis["rate"] < 1
    assert diagnosis["T1_estimate"] > 10
    assert f"--model-set T1={diagnosis['T1_estimate']}" in diagnosis["advice"]


def test_verdict_no_stable_fixed_point_when_the_map_expands():
    diagnosis = diagnose_fixed_point(linear_with([1.05, 0.5, 0.3], [1.0, 1.0, 1.0], T1=40), {},
                                     generator=seeded())
    assert diagnosis["verdict"] == analysis.NO_STABLE_FIXED_POINT
    assert diagnosis["spectral"]["rho"] == pytest.approx(1.05, abs=1e-6)
    assert diagnosis["resolved"] is True


def test_verdict_unstable_fixed_point_when_started_on_it():
    diagnosis = diagnose_fixed_point(linear_with([1.05, 0.5, 0.3], [0.0, 0.0, 0.0], T1=40), {},
                                     generator=seeded())
    assert diagnosis["verdict"] == analysis.UNSTABLE
    assert "solver=gmres" in diagnosis["advice"]


def test_verdict_falling_but_unstable_near_a_saddle():
    diagnosis = diagnose_fixed_point(linear_with([0.8, 1.01], [1.0, 0.01], T1=10), {}, generator=seeded())
    assert diagnosis["verdict"] == analysis.FALLING_UNSTABLE
    assert diagnosis["residual_2T"] < 0.9 * diagnosis["residual_T"]


def test_verdict_period_two_cycle():
    diagnosis = diagnose_fixed_point(linear_with([-0.999, 0.5], [1.0, 1.0], T1=50), {}, generator=seeded())
    assert diagnosis["verdict"] == analysis.PERIOD_TWO_CYCLE
    assert diagnosis["residual_G2"] < 0.01 * diagnosis["residual_2T"]


class LimitCycle(nn.Module):
    """Hopf normal form: F = (1 − |x|²)x + ω·rot90(x); every trajectory winds onto the unit circle."""

    config = None

    @property
    def dynamics(self) -> Dynamics:
        return Dynamics(eps=0.1, T1=200)

    def init_state(self, batch: Batch) -> State:
        return (torch.tensor([[0.5, 0.0]], dtype=torch.float64),)

    def force(self, state: State, batch: Batch) -> State:
        (x,) = state
        turn = torch.stack([-x[:, 1], x[:, 0]], dim=1)
        return ((1 - x.pow(2).sum(dim=1, keepdim=True)) * x + 2.0 * turn,)

    def project(self, state: State) -> State:
        return state

    def cost(self, state: State, batch: Batch) -> torch.Tensor:
        return state[0].sum()


def test_verdict_stalled_on_a_limit_cycle():
    diagnosis = diagnose_fixed_point(LimitCycle(), {}, generator=seeded())
    assert diagnosis["verdict"] == analysis.STALLED
    assert diagnosis["spectral"]["rho"] < 1  # one step contracts; the cycle as a whole does not converge


# --- CLI ---------------------------------------------------------------------------------------------

CET_OPTIONS = ["--model-set", "dim=16", "--model-set", "heads=2", "--model-set", "head_dim=8",
               "--model-set", "memories=16", "--batch-size", "4", "--data", "sample"]


@pytest.fixture
def epx():
    cli_main.registry.cache_clear()
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(analyze, list(args), catch_exceptions=False)

    yield invoke
    cli_main.registry.cache_clear()


def test_antisymmetry_command_json_and_out_file(epx, tmp_path):
    out = tmp_path / "deep" / "antisymmetry.json"
    result = epx("antisymmetry", "--model", "cet", *CET_OPTIONS, "--vary-s", "0,1", "--samples", "3",
                 "--json", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert json.loads(out.read_text()) == data
    assert data["format"] == "epx.analysis.antisymmetry/1"
    assert data["model"]["name"] == "cet" and data["model"]["config"]["dim"] == 16
    assert data["data"]["name"] == "sample" and data["data"]["batch_size"] == 4
    assert (data["seed"], data["dtype"], data["device"], data["samples"]) == (0, "float32", "cpu", 3)
    assert data["vary"] == "s"
    rows = data["results"]
    assert [row["settings"] for row in rows] == [{"s": 0.0}, {"s": 1.0}]
    assert rows[0]["whole"]["mean"] < 1e-6 < rows[1]["whole"]["mean"]
    assert len(rows[1]["whole"]["values"]) == 3 and isinstance(rows[1]["converged"], bool)


def test_antisymmetry_command_table(epx):
    result = epx("antisymmetry", "--model", "toy", "--model-set", "conservative=false")
    assert result.exit_code == 0, result.stderr
    assert "whole state" in result.stdout and "±" in result.stdout and "residual" in result.stdout


def test_fixed_point_command_json_and_table(epx):
    result = epx("fixed-point", "--model", "toy", "--iterations", "20", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "epx.analysis.fixed-point/1"
    assert data["iterations"] == 20 and data["data"]["name"] == "synthetic"
    diagnosis = data["diagnosis"]
    assert diagnosis["verdict"] == "converged"
    assert diagnosis["spectral"]["applications"] <= 20 and diagnosis["spectral"]["rho"] < 1
    table = epx("fixed-point", "--model", "cet", *CET_OPTIONS, "--model-set", "T1=5")
    assert table.exit_code == 0, table.stderr
    assert "not converged (still contracting)" in table.stdout and "ρ(J_G)" in table.stdout
    assert "--model-set T1=" in table.stderr


@pytest.mark.parametrize("args, fragment", [
    (["fixed-point", "--model", "cte"], "did you mean 'cet'"),
    (["antisymmetry", "--model", "cte"], "did you mean 'cet'"),
    (["antisymmetry", "--model", "toy", "--vary-s", "0,1"], "toy has no option s"),
    (["antisymmetry", "--model", "cet", "--model-set", "s=1", "--vary-s", "0,1"], "give it in one place"),
    (["antisymmetry", "--model", "cet", "--vary-s", "0,,1"], "--vary-s: expected comma-separated values"),
    (["antisymmetry", "--model", "cet", "--vary-s", "-1", "--data", "sample"], "s: -1.0 is out of range"),
    (["fixed-point", "--model", "toy", "--model-set", "unitz=3"], "did you mean 'units'"),
])
def test_usage_errors_exit_2(epx, args, fragment):
    result = epx(*args)
    assert result.exit_code == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_divergence_exits_1(epx):
    result = epx("fixed-point", "--model", "cet", *CET_OPTIONS, "--model-set", "eps=5")
    assert result.exit_code == 1
    assert "diverged at step" in result.stderr and "lower the step size" in result.stderr
