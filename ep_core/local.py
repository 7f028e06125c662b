"""Local layers: Linear, LayerNorm, causal attention and embedding whose backward pass the caller chooses.

A :class:`LocalModel` is built from these layers and computes its loss under explicit :class:`BackwardRules`,
passed down the forward call; no layer is mutated, no hook installed, no global switch flipped. Under the
default rules (:data:`EXACT`) every layer is the ordinary autograd operation, so the model's backward is backprop.

Linear y = x·Wᵀ + b, incoming gradient g = ∂L/∂y. With a feedback matrix B (W's shape) for the layer:

    ∂L/∂W = gᵀx,   ∂L/∂b = Σ g        (unchanged: the layer's own parameters get their true gradient)
    ∂L/∂x = g·B                       (instead of g·W; B = W is backprop)

LayerNorm y = γ⊙z + β, z = (x − μ)/σ, σ = √(var(x) + ε), per position over the d features. With g = ∂L/∂z =
γ⊙∂L/∂y (∂L/∂γ = Σ ∂L/∂y⊙z and ∂L/∂β = Σ ∂L/∂y are unchanged), the input gradient is one of

    exact         (g − mean(g) − z·mean(g⊙z)) / σ          the LayerNorm Jacobian: removes the mean and the
                                                           radial (along z) components, then scales by 1/σ
    center_scale  (g − mean(g)) / σ                        keeps the radial component
    projected     g − mean(g) − z·mean(g⊙z)                both removals, no 1/σ
    identity      g                                        straight through

``exact`` is the derivative of z(x) (including ε, through σ), so it equals autograd's LayerNorm backward.
A rule's ``observe`` callback receives every LayerNorm's (z, σ, g) as the backward pass meets it: what
``epx analyze layernorm`` decomposes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LN_RULES = ("exact", "center_scale", "projected", "identity")
LN_EPS = 1e-5
ATTENTION_KINDS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class LayerNormPass:
    """What a LayerNorm's backward sees: z (normalised input), σ (per position, a trailing 1) and g = ∂L/∂z."""

    z: torch.Tensor
    sigma: torch.Tensor
    g: torch.Tensor


@dataclass(frozen=True)
class BackwardRules:
    """How each local layer, by name, passes gradients to its input in one backward pass.

    ``feedback``: Linear name → B (the weight's shape) used instead of W; a Linear not named uses W.
    ``layernorm``: LayerNorm name → one of :data:`LN_RULES`; a LayerNorm not named is exact.
    ``observe(name, LayerNormPass)``: called by every LayerNorm's backward (None: nothing is recorded).
    """

    feedback: Mapping[str, torch.Tensor] = field(default_factory=dict)
    layernorm: Mapping[str, str] = field(default_factory=dict)
    observe: Callable[[str, LayerNormPass], None] | None = None

    def __post_init__(self) -> None:
        unknown = {name: rule for name, rule in self.layernorm.items() if rule not in LN_RULES}
        if unknown:
            raise ValueError(f"unknown LayerNorm backward rule(s) {unknown}; valid: {', '.join(LN_RULES)}")


EXACT = BackwardRules()


def layernorm_input_gradient(rule: str, g: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """∂L/∂x from g = ∂L/∂z under ``rule`` (module docstring), over the last dimension."""
    if rule == "identity":
        return g
    centred = g - g.mean(dim=-1, keepdim=True)
    if rule == "center_scale":
        return centred / sigma
    projected = centred - z * (g * z).mean(dim=-1, keepdim=True)
    if rule == "projected":
        return projected
    if rule == "exact":
        return projected / sigma
    raise ValueError(f"unknown LayerNorm backward rule {rule!r}; valid: {', '.join(LN_RULES)}")


def normalise(x: torch.Tensor, eps: float = LN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, σ): z = (x − mean x)/σ with σ = √(var x + ε) (biased variance) over the last dimension."""
    centred = x - x.mean(dim=-1, keepdim=True)
    sigma = (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
    return centred / sigma, sigma


class _FeedbackLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                feedback: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        x, feedback = ctx.saved_tensors
        flat_g, flat_x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_bias = flat_g.sum(0) if ctx.has_bias else None
        return g @ feedback, flat_g.T @ flat_x, grad_bias, None


class _SurrogateLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rule: str, name: str,
                observe: Callable[[str, LayerNormPass], None] | None) -> torch.Tensor:
        z, sigma = normalise(x)
        ctx.save_for_backward(z, sigma, weight)
        ctx.rule, ctx.name, ctx.observe = rule, name, observe
        return z * weight + bias

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        z, sigma, weight = ctx.saved_tensors
        g = grad_output * weight
        if ctx.observe is not None:
            ctx.observe(ctx.name, LayerNormPass(z=z, sigma=sigma, g=g))
        features = grad_output.shape[-1]
        grad_weight = (grad_output * z).reshape(-1, features).sum(0)
        grad_bias = grad_output.reshape(-1, features).sum(0)
        return layernorm_input_gradient(ctx.rule, g, z, sigma), grad_weight, grad_bias, None, None, None


class LocalLayer(nn.Module):
    """A layer whose backward the rules may change; ``name`` is its path in the model (``blocks.0.ln_1``), set by
    :func:`name_layers` when the model is built."""

    name: str = ""


class Linear(LocalLayer):
    """y = x·Wᵀ + b with weights drawn N(0, std²) from the generator and a zero bias; ``std`` is kept, since a
    feedback matrix for this layer is drawn at the same scale."""

    def __init__(self, inputs: int, outputs: int, *, std: float, generator: torch.Generator, bias: bool = True):
        super().__init__()
        self.std = std
        self.weight = nn.Parameter(torch.randn(outputs, inputs, generator=generator) * std)
        self.bias = nn.Parameter(torch.zeros(outputs)) if bias else None

    def forward(self, x: torch.Tensor, rules: BackwardRules) -> torch.Tensor:
        feedback = rules.feedback.get(self.name)
        if feedback is None:
            return F.linear(x, self.weight, self.bias)
        return _FeedbackLinear.apply(x, self.weight, self.bias, feedback.to(x.dtype))


class LayerNorm(LocalLayer):
    """y = γ⊙z + β over the last dimension (γ = 1, β = 0 at the start), ε = :data:`LN_EPS`."""

    def __init__(self, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor, rules: BackwardRules) -> torch.Tensor:
        rule = rules.layernorm.get(self.name, "exact")
        if rule == "exact" and rules.observe is None:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LN_EPS)
        return _SurrogateLayerNorm.apply(x, self.weight, self.bias, rule, self.name, rules.observe)


class Embedding(LocalLayer):
    """A table of ``count`` rows drawn N(0, std²): rows are looked up, and the backward into them is always exact
    (nothing lies before them to propagate to)."""

    def __init__(self, count: int, features: int, *, std: float, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(count, features, generator=generator) * std)

    def forward(self, ids: torch.Tensor, rules: BackwardRules) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str) -> torch.Tensor:
    """Causal attention of (B, heads, T, d_h) queries, keys and values: ``softmax`` normalises the scores
    q·kᵀ/√d_h over the visible keys; ``sigmoid`` squashes each visible score on its own (no normalisation)."""
    if kind == "softmax":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if kind != "sigmoid":
        raise ValueError(f"unknown attention {kind!r}; valid: {', '.join(ATTENTION_KINDS)}")
    steps = q.shape[-2]
    visible = torch.ones(steps, steps, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (torch.sigmoid(scores) * visible) @ v


def name_layers(model: nn.Module) -> dict[str, LocalLayer]:
    """Give every local layer of ``model`` its path as ``name``; return them by name (in module order)."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, LocalLayer):
            module.name = path
            layers[path] = module
    return layers
