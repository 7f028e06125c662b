"""localgpt — a nanoGPT-shaped character GPT built from local layers, the model of seed 003 (feedback alignment).

Tokens u (B×T) are embedded and passed through L pre-LayerNorm blocks, then read out:

    x_0 = wte[u] + wpe[0 … T−1]
    x ← x + attn(ln_1(x))          attn: c_attn (C → 3C: q, k, v in H heads), causal attention, c_proj (C → C)
    x ← x + mlp(ln_2(x))           mlp: c_fc (C → 4C), GELU, c_proj (4C → C)
    logits = lm_head(ln_f(x));   loss = next-character cross-entropy, mean over the B×T positions

``attn`` = ``softmax`` (causal softmax of q·kᵀ/√d_h, as nanoGPT) or ``sigmoid`` (each visible score squashed on
its own). No dropout; the head is not tied to the embedding, so that it is a group of its own. Initialisation is
nanoGPT's: every weight N(0, 0.02²) and the two residual projections (``c_proj``) N(0, (0.02/√(2L))²), biases
0, LayerNorms γ = 1, β = 0. Every layer is an :mod:`ep_core.local` layer, so ``local_loss(batch, rules)`` runs
the same forward pass under the backward rules an estimator chooses (fa's feedback matrices, a LayerNorm
surrogate); ``loss(batch)`` is the exact one. Groups: ``embedding``, ``attention``, ``mlp``, ``layernorm``,
``head``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ep_core.config import Config, ConfigError, option
from ep_core.local import (ATTENTION_KINDS, EXACT, BackwardRules, Embedding, LayerNorm, Linear, LocalLayer,
                            causal_attention, name_layers)
from ep_core.protocols import Batch, DataSpec

INIT_STD = 0.02


@dataclass(frozen=True)
class LocalGPTConfig(Config):
    context: int = option(64, "characters per sequence T", ge=1)
    layers: int = option(4, "transformer blocks L", ge=1)
    heads: int = option(4, "attention heads (each width/heads wide)", ge=1)
    width: int = option(128, "embedding width C", ge=1)
    attn: str = option("softmax", "attention: causal softmax, or an elementwise sigmoid of the scores",
                       choices=ATTENTION_KINDS)
    vocab: int | None = option(None, "vocabulary size; taken from the dataset when unset", ge=1, optional=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width % self.heads:
            raise ConfigError("heads", f"width {self.width} must be divisible by heads={self.heads}")


class Attention(nn.Module):
    def __init__(self, cfg: LocalGPTConfig, *, generator: torch.Generator):
        super().__init__()
        self.heads, self.kind = cfg.heads, cfg.attn
        self.c_attn = Linear(cfg.width, 3 * cfg.width, std=INIT_STD, generator=generator)
        self.c_proj = Linear(cfg.width, cfg.width, std=INIT_STD / math.sqrt(2 * cfg.layers), generator=generator)

    def forward(self, x: torch.Tensor, rules: BackwardRules) -> torch.Tensor:
        batch, steps, width = x.shape
        q, k, v = (t.view(batch, steps, self.heads, width // self.heads).transpose(1, 2)
                   for t in self.c_attn(x, rules).split(width, dim=-1))
        mixed = causal_attention(q, k, v, self.kind).transpose(1, 2).reshape(batch, steps, width)
        return self.c_proj(mixed, rules)


class MLP(nn.Module):
    def __init__(self, cfg: LocalGPTConfig, *, generator: torch.Generator):
        super().__init__()
        self.c_fc = Linear(cfg.width, 4 * cfg.width, std=INIT_STD, generator=generator)
        self.c_proj = Linear(4 * cfg.width, cfg.width, std=INIT_STD / math.sqrt(2 * cfg.layers), generator=generator)

    def forward(self, x: torch.Tensor, rules: BackwardRules) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x, rules)), rules)


class Block(nn.Module):
    def __init__(self, cfg: LocalGPTConfig, *, generator: torch.Generator):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width)
        self.attn = Attention(cfg, generator=generator)
        self.ln_2 = LayerNorm(cfg.width)
        self.mlp = MLP(cfg, generator=generator)

    def forward(self, x: torch.Tensor, rules: BackwardRules) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x, rules), rules)
        return x + self.mlp(self.ln_2(x, rules), rules)


class LocalGPT(nn.Module):
    Config: ClassVar[type[Config]] = LocalGPTConfig
    data: ClassVar[DataSpec] = DataSpec(kind="text", shape=lambda cfg: (cfg.context,), datasets=("shakespeare",),
                                        batch_size=32, from_data=lambda dataset: {"vocab": dataset.vocab_size})
    # Seed 003's AdamW: lr 1e-3, constant, no warm-up, no clipping (its weight decay is torch's default, 0.01).
    training_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "warmup": 0, "min_lr": 1.0, "clip": None}

    def __init__(self, config: LocalGPTConfig | None = None, *, generator: torch.Generator):
        super().__init__()
        self.config = cfg = config or LocalGPTConfig()
        if cfg.vocab is None:
            raise ConfigError("vocab", "localgpt needs a vocabulary size: load it with a text dataset, or set "
                                       "vocab=N")
        self.wte = Embedding(cfg.vocab, cfg.width, std=INIT_STD, generator=generator)
        self.wpe = Embedding(cfg.context, cfg.width, std=INIT_STD, generator=generator)
        self.blocks = nn.ModuleList(Block(cfg, generator=generator) for _ in range(cfg.layers))
        self.ln_f = LayerNorm(cfg.width)
        self.lm_head = Linear(cfg.width, cfg.vocab, std=INIT_STD, generator=generator, bias=False)
        self._layers = name_layers(self)

    def local_layers(self) -> dict[str, LocalLayer]:
        return dict(self._layers)

    def parameter_groups(self) -> dict[str, list[str]]:
        names = [name for name, _ in self.named_parameters()]
        return {
            "embedding": [n for n in names if n.startswith(("wte.", "wpe."))],
            "attention": [n for n in names if ".attn." in n],
            "mlp": [n for n in names if ".mlp." in n],
            "layernorm": [n for n in names if ".ln_" in n or n.startswith("ln_f.")],
            "head": [n for n in names if n.startswith("lm_head.")],
        }

    def prepare_batch(self, inputs: torch.Tensor, targets: torch.Tensor, *, generator: torch.Generator) -> Batch:
        self.data.check_tokens("localgpt", self.config, inputs, targets, vocab=self.config.vocab)
        device = self.lm_head.weight.device
        return {"tokens": inputs.to(device), "targets": targets.to(device)}

    def logits(self, batch: Batch, rules: BackwardRules = EXACT) -> torch.Tensor:
        tokens = batch["tokens"]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens, rules) + self.wpe(positions, rules)
        for block in self.blocks:
            x = block(x, rules)
        return self.lm_head(self.ln_f(x, rules), rules)

    def local_loss(self, batch: Batch, rules: BackwardRules) -> torch.Tensor:
        logits = self.logits(batch, rules)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1))

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.local_loss(batch, EXACT)
