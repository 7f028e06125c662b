"""resmlp — a residual MLP classifier, the model of seed 004 (direct feedback alignment with a residual penalty).

An input x (an image, flattened to C·H·W numbers) is embedded, passed through L residual blocks and read out:

    h_0 = x·W_embᵀ + b_emb                                  embed: Linear(C·H·W → d)
    h_{l+1} = h_l + f_l(h_l),   f_l(h) = W2·GELU(W1·LN(h) + b1) + b2     l = 0 … L−1
    logits = LN_out(h_L)·W_headᵀ + b_head                   readout: final LayerNorm and head
    loss = cross-entropy(logits, y), mean over the batch

The input size and the number of classes come from the data (3×32×32 and 10 for CIFAR-10, 1×28×28 and 10 for
Fashion-MNIST); the inputs are standardised per channel with the dataset's training-set mean and std, as seed
004's ``transforms.Normalize`` does (``DataSpec.normalize``).
Parameters are drawn from the generator with PyTorch's default Linear initialisation (uniform
in ±1/√fan_in), LayerNorm weights 1 and biases 0. Groups: ``embed``, ``block0`` … ``block{L-1}``, ``readout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ep_core.config import Config, ConfigError, option
from ep_core.protocols import Batch, DataSpec


@dataclass(frozen=True)
class ResMLPConfig(Config):
    dim: int = option(256, "width d of the residual stream", ge=1)
    blocks: int = option(4, "residual blocks L", ge=1)
    hidden: int | None = option(None, "width of each block's hidden layer; none: d", ge=1, optional=True)
    channels: int = option(1, "image channels (from the data)", ge=1)
    image: int = option(28, "image height and width (from the data)", ge=1)
    classes: int = option(10, "classes (from the data)", ge=2)


def _image_settings(dataset: Any) -> dict[str, Any]:
    description = dataset.describe()
    channels, height, width = description["shape"]
    if height != width:
        raise ConfigError("image", f"resmlp takes square images; {description['name']} has {height}×{width}")
    return {"channels": channels, "image": height, "classes": description["classes"]}


def _uniform(generator: torch.Generator, fan_in: int, *shape: int) -> nn.Parameter:
    bound = 1 / math.sqrt(fan_in)
    return nn.Parameter((2 * torch.rand(*shape, generator=generator) - 1) * bound)


class Linear(nn.Module):
    def __init__(self, inputs: int, outputs: int, *, generator: torch.Generator):
        super().__init__()
        self.weight = _uniform(generator, inputs, outputs, inputs)
        self.bias = _uniform(generator, inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Block(nn.Module):
    """f(h) = W2·GELU(W1·LN(h) + b1) + b2: the residual branch only (the skip is added by the model)."""

    def __init__(self, dim: int, hidden: int, *, generator: torch.Generator):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, hidden, generator=generator)
        self.fc2 = Linear(hidden, dim, generator=generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(h))))


class ResMLP(nn.Module):
    Config: ClassVar[type[Config]] = ResMLPConfig
    data: ClassVar[DataSpec] = DataSpec(kind="images", shape=lambda cfg: (cfg.channels, cfg.image, cfg.image),
                                        datasets=("cifar10", "fashionmnist"), batch_size=128,
                                        from_data=_image_settings, normalize=True)
    # Seed 004's AdamW: lr 1e-3 with a cosine decay to 0 over the run and no warm-up (its weight decay, 0.01, and
    # its clipping at norm 1 per block are epx's defaults already).
    training_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "warmup": 0, "min_lr": 0.0}

    def __init__(self, config: ResMLPConfig | None = None, *, generator: torch.Generator):
        super().__init__()
        self.config = cfg = config or ResMLPConfig()
        self.width, self.classes = cfg.dim, cfg.classes
        inputs = cfg.channels * cfg.image**2
        self.embedding = Linear(inputs, cfg.dim, generator=generator)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.hidden or cfg.dim, generator=generator)
                                    for _ in range(cfg.blocks))
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.head = Linear(cfg.dim, cfg.classes, generator=generator)

    def parameter_groups(self) -> dict[str, list[str]]:
        names = [name for name, _ in self.named_parameters()]
        groups = {"embed": [n for n in names if n.startswith("embedding.")]}
        for index in range(len(self.blocks)):
            groups[f"block{index}"] = [n for n in names if n.startswith(f"blocks.{index}.")]
        groups["readout"] = [n for n in names if n.startswith(("out_norm.", "head."))]
        return groups

    def prepare_batch(self, inputs: torch.Tensor, targets: torch.Tensor, *, generator: torch.Generator) -> Batch:
        """Images (B×C×H×W) flattened to the embedding's input; labels as they come."""
        cfg = self.config
        self.data.check_images("resmlp", cfg, inputs)
        if targets.dim() != 1 or int(targets.max()) >= cfg.classes:
            raise ConfigError("classes", f"labels must be 0 … {cfg.classes - 1}, got up to {int(targets.max())}")
        return {"inputs": inputs.flatten(1), "labels": targets}

    def branches(self) -> nn.ModuleList:
        return self.blocks

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.embedding(inputs)

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.out_norm(hidden))

    def forward_hidden(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        hidden = [self.embed(batch["inputs"])]
        for block in self.blocks:
            hidden.append(hidden[-1] + block(hidden[-1]))
        return hidden, self.readout(hidden[-1])

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.forward_hidden(batch)[1], batch["labels"])

    def metrics(self, batch: Batch) -> dict[str, float]:
        with torch.no_grad():
            logits = self.forward_hidden(batch)[1]
            return {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}
