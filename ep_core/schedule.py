"""What a training run is configured by (:class:`TrainConfig`) and its learning-rate schedule. Plain Python, no
torch, so that the command line can build ``epx train``'s options (and its --help) without loading torch.

    η_t = lr · t/warmup                                       during warm-up (t ≤ warmup)
    η_t = lr · (m + (1 − m)·½(1 + cos π·u))                   after it; u ∈ (0, 1] the fraction of the
                                                              post-warm-up steps done, m = min_lr

The length of a run is ``steps`` or ``epochs`` (not both): an epoch is ⌊N/B⌋ steps for a training set of N
samples and batches of B, so ``epochs`` needs a model that learns from a dataset. Three options default to
values scaled to the length of the run, so that a short run (``--steps 20``) leaves warm-up, validates a few times
and compares with the reference at least once: ``warmup`` = min(20, steps // 10), ``eval_every`` = min(25,
⌈steps / 4⌉), ``diagnose_every`` = min(50, ⌈steps / 4⌉). The comparison with the reference also runs after the
last step (unless ``diagnose_every`` is 0). A model may set its own defaults under the user's (resmlp: seed 004's
lr 1e-3, no warm-up, decay to 0).

``freeze`` names parameter groups (glob patterns, comma-separated: ``block*``) that training leaves as they
were initialised: the optimizer never sees them (so weight decay does not move them either).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Self

from ep_core.config import Config, ConfigError, option


@dataclass(frozen=True)
class TrainConfig(Config):
    steps: int | None = option(None, "optimizer steps; none: 300, or --epochs", ge=1, optional=True)
    epochs: int | None = option(None, "passes of ⌊N/batch⌋ steps over the training data (instead of --steps)", ge=1,
                                optional=True)
    lr: float = option(3e-3, "peak learning rate", gt=0)
    warmup: int | None = option(None, "steps of linear warm-up to lr; none: min(20, steps/10)", ge=0,
                                optional=True)
    min_lr: float = option(0.1, "learning rate at the end of the cosine decay, as a fraction of lr", ge=0, le=1)
    weight_decay: float = option(0.01, "decoupled weight decay (AdamW) or L2 penalty (SGD)", ge=0)
    optimizer: str = option("adamw", "the optimizer: adamw, or sgd with momentum 0.9", choices=("adamw", "sgd"))
    clip: float | None = option(1.0, "largest gradient norm of each parameter group; none: no clipping", gt=0,
                                optional=True)
    eval_every: int | None = option(None, "steps between validation losses (also at step 0 and at the end); "
                                          "none: min(25, steps/4)", ge=1, optional=True)
    eval_batches: int = option(4, "held-out batches per validation loss", ge=1)
    jacobian_penalty: float = option(0.0, "weight λ of the Jacobian penalty λ·||J_G(x*)||²_F/n; 0: off", ge=0)
    diagnose_every: int | None = option(None, "steps between comparisons with the reference gradient (also "
                                              "after the last step); 0: never; none: min(50, steps/4)", ge=0,
                                        optional=True)
    checkpoint_every: int = option(50, "steps between checkpoints (also at the end)", ge=1)
    freeze: str = option("", "parameter groups to keep as initialised: comma-separated globs such as block*")
    augment: bool = option(False, "training images get seed 004's augmentation: a random crop after 4-pixel "
                                  "zero padding and a random horizontal flip, drawn from the data generator")

    @property
    def frozen_patterns(self) -> list[str]:
        return [pattern.strip() for pattern in self.freeze.split(",") if pattern.strip()]

    def resolved(self, steps_per_epoch: int | None = None) -> Self:
        """This config with every ``none`` default replaced by its value for the run's length (module docstring);
        ``steps_per_epoch`` (⌊N/B⌋) turns ``epochs`` into ``steps``."""
        steps = self.steps
        if self.epochs is not None:
            if steps_per_epoch is None and steps is None:
                raise ConfigError("epochs", "--epochs needs a model that learns from a dataset; give --steps")
            if steps_per_epoch is not None:
                # A resolved config keeps both; a user's config may hold only one of them.
                if steps is not None and steps != self.epochs * steps_per_epoch:
                    raise ConfigError("epochs", f"give --epochs or --steps, not both (got {self.epochs} and {steps})")
                steps = self.epochs * steps_per_epoch
        steps = 300 if steps is None else steps
        quarter = math.ceil(steps / 4)
        return dataclasses.replace(
            self,
            steps=steps,
            warmup=min(20, steps // 10) if self.warmup is None else self.warmup,
            eval_every=min(25, quarter) if self.eval_every is None else self.eval_every,
            diagnose_every=min(50, quarter) if self.diagnose_every is None else self.diagnose_every,
        )


def learning_rate(config: TrainConfig, step: int) -> float:
    """η for the update of step ``step`` (1-based): linear warm-up, then cosine decay to min_lr·lr."""
    config = config.resolved()
    if step <= config.warmup:
        return config.lr * step / config.warmup
    decay_steps = config.steps - config.warmup
    done = (step - config.warmup) / decay_steps
    return config.lr * (config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * done)))
