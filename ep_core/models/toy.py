"""toy — a tiny continuous Hopfield network, conservative or not, for fast property tests.

State x (B×n), input u (B×m), ρ = tanh. With coupling W, bias b and input weights U,

    F(x) = −x + ρ'(x) ⊙ (ρ(x)·W_effᵀ + b + u·Uᵀ),

where W_eff = ½(W + Wᵀ) when ``conservative`` (then F = −∂E/∂x for
E(x) = ½||x||² − ½ρ(x)ᵀW_eff ρ(x) − bᵀρ(x) − ρ(x)ᵀUu) and W_eff = W otherwise (no energy exists).
The last ``outputs`` units are read out; the cost is C = ½ mean_b ||x_out − target||².

W is scaled at initialisation to spectral norm ``coupling`` < 1. At a fixed point x has the sign of
b + Uu + Wρ(x), so the ρ'' term of the Jacobian is non-positive, and the fixed point is unique and stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ep_core.config import Config, ConfigError, option
from ep_core.protocols import Batch, DataSpec, Dynamics, State
from ep_core.relax import unrolled_loss
from ep_core.solvers import memory_option, solver_option, tol_option


@dataclass(frozen=True)
class ToyConfig(Config):
    units: int = option(6, "units n", ge=1)
    inputs: int = option(3, "input width m", ge=1)
    outputs: int = option(2, "read-out units (the last ones)", ge=1)
    conservative: bool = option(True, "symmetric coupling (an energy exists) or not")
    coupling: float = option(0.5, "spectral norm of W at initialisation", ge=0, lt=1)
    eps: float = option(0.2, "relaxation step size ε", gt=0)
    T1: int = option(300, "free-phase steps", ge=1)
    solver: str = solver_option()
    tol: float = tol_option()
    memory: int = memory_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outputs > self.units:
            raise ConfigError("outputs", f"{self.outputs} read-out units need at least as many units "
                                         f"(units={self.units})")


class Toy(nn.Module):
    Config: ClassVar[type[Config]] = ToyConfig
    data: ClassVar[DataSpec] = DataSpec(kind="synthetic", batch_size=32)
    state_names: ClassVar[tuple[str, ...]] = ("x",)
    step_size_field: ClassVar[str] = "eps"

    def __init__(self, config: ToyConfig | None = None, *, generator: torch.Generator):
        super().__init__()
        self.config = cfg = config or ToyConfig()
        coupling = torch.randn(cfg.units, cfg.units, generator=generator)
        if cfg.conservative:
            coupling = coupling + coupling.T
        spectral = torch.linalg.matrix_norm(coupling, ord=2).clamp_min(1e-12)
        self.W = nn.Parameter(coupling * (cfg.coupling / spectral))
        self.b = nn.Parameter(0.3 * torch.randn(cfg.units, generator=generator))
        self.U = nn.Parameter(torch.randn(cfg.units, cfg.inputs, generator=generator) / cfg.inputs**0.5)

    @property
    def dynamics(self) -> Dynamics:
        cfg = self.config
        return Dynamics(eps=cfg.eps, T1=cfg.T1, solver=cfg.solver, tol=cfg.tol, memory=cfg.memory)

    def parameter_groups(self) -> dict[str, list[str]]:
        return {"coupling": ["W"], "input": ["U", "b"]}

    def loss(self, batch: Batch) -> torch.Tensor:
        return unrolled_loss(self, batch)

    def make_batch(self, size: int, *, generator: torch.Generator) -> Batch:
        """Random inputs and targets in (−0.9, 0.9), reachable by tanh units."""
        cfg = self.config
        inputs = torch.randn(size, cfg.inputs, generator=generator)
        targets = 1.8 * torch.rand(size, cfg.outputs, generator=generator) - 0.9
        return self.prepare_batch(inputs, targets, generator=generator)

    def prepare_batch(self, inputs: torch.Tensor, targets: torch.Tensor, *, generator: torch.Generator) -> Batch:
        """Inputs (B×m) and targets (B×outputs), in the model's dtype and on its device."""
        cfg = self.config
        if inputs.dim() != 2 or inputs.shape[1] != cfg.inputs or targets.shape != (inputs.shape[0], cfg.outputs):
            raise ConfigError("inputs", f"toy expects inputs (B, {cfg.inputs}) and targets (B, {cfg.outputs}), got "
                                        f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
        like = {"dtype": self.W.dtype, "device": self.W.device}
        return {"inputs": inputs.to(**like), "targets": targets.to(**like)}

    def coupling_matrix(self) -> torch.Tensor:
        return 0.5 * (self.W + self.W.T) if self.config.conservative else self.W

    def init_state(self, batch: Batch) -> State:
        return (torch.zeros(batch["inputs"].shape[0], self.config.units, dtype=self.W.dtype, device=self.W.device),)

    def force(self, state: State, batch: Batch) -> State:
        return self._flow(state, batch, self.coupling_matrix())

    def nonconservative(self, state: State, batch: Batch) -> State:
        """N(x) = ρ'(x) ⊙ (ρ(x)·Aᵀ), A = ½(W_eff − W_effᵀ): F − N is the gradient flow of E with the symmetric
        part of W_eff, so N is the whole non-gradient part (zero when conservative)."""
        (x,) = state
        rho = torch.tanh(x)
        coupling = self.coupling_matrix()
        return ((1 - rho.pow(2)) * (rho @ (0.5 * (coupling - coupling.T)).T),)

    def conservative(self, state: State, batch: Batch) -> State:
        """F − N, the force with W_eff replaced by its symmetric part
        (:class:`~ep_core.protocols.DeclaresConservative`)."""
        coupling = self.coupling_matrix()
        return self._flow(state, batch, 0.5 * (coupling + coupling.T))

    def _flow(self, state: State, batch: Batch, coupling: torch.Tensor) -> State:
        """−x + ρ'(x) ⊙ (ρ(x)·couplingᵀ + b + u·Uᵀ)."""
        (x,) = state
        rho = torch.tanh(x)
        drive = rho @ coupling.T + self.b + batch["inputs"] @ self.U.T
        return (-x + (1 - rho.pow(2)) * drive,)

    def energy(self, state: State, batch: Batch) -> torch.Tensor:
        """E(x), summed over the batch; defined only in the conservative case."""
        if not self.config.conservative:
            raise ValueError("a non-conservative toy has no energy")
        (x,) = state
        rho = torch.tanh(x)
        return (0.5 * x.pow(2).sum() - 0.5 * ((rho @ self.coupling_matrix()) * rho).sum()
                - (rho * self.b).sum() - (rho * (batch["inputs"] @ self.U.T)).sum())

    def project(self, state: State) -> State:
        return state

    def cost(self, state: State, batch: Batch) -> torch.Tensor:
        (x,) = state
        readout = x[:, -self.config.outputs:]
        return 0.5 * (readout - batch["targets"]).pow(2).sum(dim=1).mean()
