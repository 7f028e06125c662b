"""Seed 003's study: how much each part of LayerNorm's Jacobian matters to the gradient a local model trains with.

Train a :class:`~ep_core.protocols.LocalModel` for K steps with an estimator that chooses its backward rules
(fa), then run one backward pass of that estimator on a diagnostic batch and, at every LayerNorm, decompose the
gradient g = ∂L/∂z that reaches it (z the normalised input, σ its scale; per position over the d features):

    mean component     m = mean(g)·1                 removed by every rule but identity
    radial component   r = z·mean(g⊙z)               removed by exact and projected
    r_mean   = Σ‖m‖² / Σ‖g‖²,   r_radial = Σ‖r‖² / Σ‖g‖²      (sums over positions; both in [0, 1], and
                                                             r_mean + r_radial ≤ 1: m ⊥ r since mean(z) = 0)
    true     = (g − m − r)/σ                          the exact LayerNorm backward
    cos_rule = mean over positions of cos(rule(g), true)   for center_scale (g − m)/σ, projected g − m − r and
                                                           identity g (seed 003's cosine); cos_exact = 1 is the
                                                           check of the pass
    batch_cos_rule = cos(rule(g), true) over the whole batch at once

projected differs from the exact backward by the factor σ of each position alone, so its per-position cosine is
1 by construction; the batch cosine sees how the surrogate weighs the positions against each other (σ varies
over them), which is what the parameters' gradients, summed over positions, inherit.

with σ's mean and standard deviation over the positions. A small r_mean and r_radial mean the surrogates lose
little; a surrogate's cosine says how far its backward is from LayerNorm's. The average row is the plain mean
over the LayerNorms (seed 003's AVG line). `epx train` records, at every comparison with the reference, each
LayerNorm's batch cosine of the rule it is trained with (:func:`surrogate_cosines`); `epx analyze layernorm`
trains for K steps and then reports everything here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ep_core.local import LN_RULES, LayerNormPass, layernorm_input_gradient
from ep_core.protocols import Batch

COLUMNS = ("r_mean", "r_radial", "sigma_mean", "sigma_std", "cos_center_scale", "cos_identity",
           "batch_cos_center_scale", "batch_cos_projected", "batch_cos_identity")
#: Seed 003's training before the study: AdamW at a constant lr 1e-3, no warm-up, no clipping, torch's weight decay.
TRAINING = {"lr": "1e-3", "warmup": "0", "min_lr": "1", "clip": "none", "weight_decay": "0.01"}


def decompose(data: LayerNormPass) -> dict[str, float]:
    """The study's numbers (module docstring) for one LayerNorm's backward pass."""
    g, z, sigma = data.g.double(), data.z.double(), data.sigma.double()
    features = g.shape[-1]
    mean_part = g.mean(dim=-1, keepdim=True).expand_as(g)
    radial_part = z * (g * z).mean(dim=-1, keepdim=True)
    energy = g.pow(2).sum().clamp_min(torch.finfo(g.dtype).tiny)
    true = layernorm_input_gradient("exact", g, z, sigma).reshape(-1, features)
    record = {"r_mean": float(mean_part.pow(2).sum() / energy), "r_radial": float(radial_part.pow(2).sum() / energy),
              "sigma_mean": float(sigma.mean()), "sigma_std": float(sigma.std()) if sigma.numel() > 1 else 0.0}
    for rule in LN_RULES:
        surrogate = layernorm_input_gradient(rule, g, z, sigma).reshape(-1, features)
        record[f"cos_{rule}"] = float(F.cosine_similarity(surrogate, true, dim=-1).mean())
        record[f"batch_cos_{rule}"] = float(F.cosine_similarity(surrogate.flatten(), true.flatten(), dim=0))
    return record


def layernorm_decomposition(model: Any, batch: Batch, rules: Any) -> dict[str, dict[str, float]]:
    """Run ``rules``' backward pass of ``model.local_loss`` on ``batch`` and decompose it at every LayerNorm, in
    the model's order (the first LayerNorm first). Parameters' ``grad`` are left untouched."""
    seen: dict[str, LayerNormPass] = {}
    watched = dataclasses.replace(rules, observe=lambda name, data: seen.__setitem__(name, data))
    parameters = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        torch.autograd.grad(model.local_loss(batch, watched), parameters, allow_unused=True)
    order = [name for name in model.local_layers() if name in seen]
    return {name: decompose(seen[name]) for name in order}


def average(layers: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {key: sum(row[key] for row in layers.values()) / len(layers) for key in next(iter(layers.values()))}


def surrogate_cosines(model: Any, batch: Batch, rules: Any) -> dict[str, float]:
    """Each LayerNorm's batch cosine of the rule ``rules`` give it to the exact backward, on ``rules``' pass."""
    return {name: row[f"batch_cos_{rules.layernorm.get(name, 'exact')}"]
            for name, row in layernorm_decomposition(model, batch, rules).items()}
