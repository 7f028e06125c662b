"""dfa — direct feedback alignment with a residual-branch penalty (Nøkland 2016; the penalty is seed 004's).

On a residual network h_0 = embed(x), h_{l+1} = h_l + f_l(h_l), logits = readout(h_L), with the output error
e = softmax(logits) − onehot(y) (B×K) and a fixed random feedback matrix B_l (d×K) per block:

    â_l = e·B_lᵀ / (rms(e·B_lᵀ) + 10⁻⁶)                       per sample: the block's teaching signal
    ℓ_l = mean_b [⟨f_l(h_l), â_l⟩ + λ·||f_l(h_l)||²]            block l, with h_l held fixed (detached)
    ℓ_emb = mean_b ⟨embed(x), â_0⟩                              the embedding
    ℓ_out = cross-entropy(readout(h_L), y)                      the read-out, h_L held fixed
    ĝ = ∂(ℓ_emb + Σ_l ℓ_l + ℓ_out)/∂θ

Because every block sees its input detached, no gradient flows from block to block: the L block gradients are
independent and come out of one forward pass and one backward pass over the whole objective together, not a
chain of backward passes. The read-out gets the true gradient of the loss (its cosine to backprop is 1); the
penalty adds 2λ/B·(∂f_l/∂θ)ᵀf_l to block l, pulling the residual branches toward zero so that the residual stream
cannot explode. DFA has no exact limit: the embedding and blocks follow random projections of the error, which
align with the true gradient only as far as training makes the forward weights align with B.

The feedback matrices are estimator state: ``init(model, generator=...)`` draws them (entries N(0, σ²)
or uniform with the same σ, σ = ``scale`` or 1/√K), ``state_dict`` gives them as tensors B0 … B{L-1}, and
``load_state_dict`` puts them back (checkpoints hold them; a resumed run continues with the same ones).
Cost: one forward and one backward pass, like backprop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ep_core.config import Config, option
from ep_core.errors import ConfigError
from ep_core.protocols import Batch, GradientEstimate, ResidualModel, matching_state
from ep_core.relax import parameter_gradient

RMS_FLOOR = 1e-6


@dataclass(frozen=True)
class DFAConfig(Config):
    lam: float = option(0.0, "λ: weight of the residual-branch penalty λ·||f_l(h_l)||²", ge=0)
    feedback: str = option("gaussian", "distribution of the feedback entries", choices=("gaussian", "uniform"))
    scale: float | None = option(None, "standard deviation σ of the feedback entries; none: 1/√classes", gt=0,
                                 optional=True)


def teaching_signal(error: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """â = e·Bᵀ divided by its per-sample root mean square."""
    projected = error @ feedback.T
    return projected / (projected.pow(2).mean(dim=-1, keepdim=True).sqrt() + RMS_FLOOR)


def penalty_gradient(estimator: DFA, model: ResidualModel, batch: Batch, seed: int) -> None:
    """The penalty's gradient: ĝ(λ) − ĝ(0) = 2λ/B·(∂f_l/∂θ)ᵀ f_l(h_l) on block l's parameters, and 0 elsewhere
    (with λ = 0.5 when the estimator's own λ is 0), the feedback matrices being the same."""
    lam = estimator.config.lam or 0.5
    state = estimator.state_dict()
    estimates = []
    for weight in (lam, 0.0):
        rule = type(estimator)(estimator.config.replace(lam=weight))
        rule.feedback = [state[f"B{index}"] for index in range(len(state))]
        estimates.append(rule.estimate(model, batch, generator=torch.Generator().manual_seed(seed)).grads)
    with torch.no_grad():
        hidden = model.forward_hidden(batch)[0]
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    size = batch["labels"].shape[0]
    with torch.enable_grad():
        for block, h in zip(model.branches(), hidden):
            branch = block(h.detach())
            params = list(block.parameters())
            for p, g in zip(params, torch.autograd.grad(branch, params, grad_outputs=2 * lam * branch / size)):
                expected[names[id(p)]] = g
    tolerance = 1e3 * torch.finfo(next(model.parameters()).dtype).eps
    for name, target in expected.items():
        difference = estimates[0][name] - estimates[1][name]
        error = float((difference - target).abs().max())
        assert error <= tolerance * (1 + float(target.abs().max())), (
            f"{name}: ĝ(λ={lam:g}) − ĝ(0) is off 2λ/B·(∂f/∂θ)ᵀf by {error:.3g}")


class DFA:
    name: ClassVar[str] = "dfa"
    Config: ClassVar[type[Config]] = DFAConfig
    requires: ClassVar[type] = ResidualModel
    exact_limit: ClassVar[str] = "none (the read-out alone gets the true gradient)"
    conformance_limit: ClassVar[str | None] = None
    properties: ClassVar[tuple] = (penalty_gradient,)

    def __init__(self, config: DFAConfig | None = None):
        self.config = config or DFAConfig()
        self.feedback: list[torch.Tensor] | None = None

    def init(self, model: ResidualModel, *, generator: torch.Generator) -> None:
        """Draw B_0 … B_{L−1} (d×K) from ``generator`` (a CPU generator gives the same matrices on any device)."""
        width = model.width
        sigma = self.config.scale if self.config.scale is not None else model.classes ** -0.5
        parameter = next(model.parameters())
        matrices = []
        for _ in model.branches():
            if self.config.feedback == "gaussian":
                draw = torch.randn(width, model.classes, generator=generator, dtype=torch.float64)
            else:
                draw = (2 * torch.rand(width, model.classes, generator=generator, dtype=torch.float64) - 1) * 3**0.5
            matrices.append((sigma * draw).to(dtype=parameter.dtype, device=parameter.device))
        self.feedback = matrices

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"B{index}": matrix for index, matrix in enumerate(self._built())}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        loaded = matching_state("dfa", self.state_dict(), state)
        self.feedback = [loaded[f"B{index}"] for index in range(len(loaded))]

    def _built(self) -> list[torch.Tensor]:
        if self.feedback is None:
            raise ConfigError("state", "dfa's feedback matrices are not built yet: call init(model, "
                                       "generator=...) first (compare, train and the kit do)")
        return self.feedback

    def estimate(self, model, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
        feedback, lam = self._built(), self.config.lam
        if len(feedback) != len(model.branches()) or feedback[0].shape != (model.width, model.classes):
            raise ConfigError("state", f"dfa's feedback matrices were built for another model ({len(feedback)} of "
                                       f"{tuple(feedback[0].shape)}); call init(model, generator=...) again")
        labels = batch["labels"]

        def local_objectives() -> torch.Tensor:
            embedded = model.embed(batch["inputs"])
            h = embedded.detach()
            branches = []
            for block in model.branches():
                branch = block(h)
                branches.append(branch)
                h = h + branch.detach()
            logits = model.readout(h)
            with torch.no_grad():
                error = logits.softmax(dim=-1) - F.one_hot(labels, model.classes).to(logits.dtype)
            signals = [teaching_signal(error, matrix) for matrix in feedback]
            total = F.cross_entropy(logits, labels) + (embedded * signals[0]).sum(dim=-1).mean()
            for branch, signal in zip(branches, signals):
                total = total + (branch * signal).sum(dim=-1).mean() + lam * branch.pow(2).sum(dim=-1).mean()
            return total

        return GradientEstimate(grads=parameter_gradient(model, local_objectives))
