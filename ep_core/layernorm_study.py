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
over the LayerNorms (seed 003's AVG line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ep_core.errors import ConfigError
from ep_core.local import LN_RULES, LayerNormPass, layernorm_input_gradient
from ep_core.protocols import Batch, ChoosesBackwardRules
from ep_core.seeding import EVAL_MASK_STREAM, PROBE_STREAM, generator
from ep_core.session import draw_batch
from ep_core.train import Progress, build_run, train

COLUMNS = ("r_mean", "r_radial", "sigma_mean", "sigma_std", "cos_center_scale", "cos_identity",
           "batch_cos_center_scale", "batch_cos_projected", "batch_cos_identity")
#: Seed 003's training: AdamW at a constant lr 1e-3, no warm-up, no clipping, batch 32, torch's weight decay.
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


def layernorm_study(registry: Any, estimator: str, model: str, *, attn: Sequence[str] = ("softmax",),
                    steps: int = 250, settings: Mapping[str, str] | None = None,
                    model_settings: Mapping[str, str] | None = None, data: str = "auto",
                    data_dir: str | None = None, download: bool = True, warn: Callable[[str], None] | None = None,
                    batch_size: int = 32, seed: int = 1337, dtype: str = "float32", device: str = "cpu",
                    on_record: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """For each attention kind: ``steps`` steps of training with ``estimator`` (seed 003's AdamW, :data:`TRAINING`),
    then :func:`layernorm_decomposition` of its backward pass on one diagnostic batch of the training data (drawn
    from the seed's PROBE stream). ``on_record(attn, record)`` sees each training record."""
    runs = {}
    for kind in attn:
        run = build_run(registry, estimator, model, settings=settings, model_settings={**(model_settings or {}),
                                                                                       "attn": kind},
                        train_settings={**TRAINING, "steps": str(steps), "diagnose_every": "0"}, data=data,
                        data_dir=data_dir, download=download, warn=warn, batch_size=batch_size, seed=seed,
                        dtype=dtype, device=device, reference=None)
        if not isinstance(run.estimator, ChoosesBackwardRules):
            raise ConfigError("estimator", f"{estimator} does not expose its backward rules (ChoosesBackwardRules); "
                                           "the LayerNorm study needs an estimator such as fa")
        watch = Progress(on_record=lambda record, kind=kind: on_record(kind, record)) if on_record else None
        log = train(run, progress=watch)
        batch = draw_batch(run.model, run.dataset, batch_size, data=generator(seed, PROBE_STREAM),
                           mask=generator(seed, EVAL_MASK_STREAM))
        layers = layernorm_decomposition(run.model, batch, run.estimator.backward_rules(run.model))
        final = [r for r in log if r["kind"] == "eval"]
        runs[kind] = {"layers": layers, "average": average(layers), "spec": run.spec,
                      "val_loss": final[-1]["val_loss"] if final else None, "data": run.data_description}
    return {"estimator": estimator, "model": model, "steps": steps, "batch_size": batch_size, "seed": seed,
            "runs": runs}

