"""fa — feedback alignment (Lillicrap et al. 2016) with LayerNorm surrogate backward passes (seed 003).

On a :class:`~ep_core.protocols.LocalModel` every Linear y = x·Wᵀ + b sends its incoming gradient g = ∂L/∂y
back through a feedback matrix B of W's shape instead of W, and every LayerNorm through one of four backward
rules (g = ∂L/∂z, z the normalised input, σ its scale; :mod:`ep_core.local`):

    ∂L/∂x = g·B                                          Linear, B by ``mode``:
        random      B ~ N(0, s²), s the layer's initialisation std, drawn once (estimator state)
        sign        B = sign(W)·rms(W)                    sign-symmetry, at W's scale (‖B‖_F = ‖W‖_F)
        transpose   B = W                                 backprop's own pass
    ∂L/∂x = (g − mean g − z·mean(g⊙z))/σ                  LayerNorm ``exact``
            (g − mean g)/σ                                ``center_scale``
            g − mean g − z·mean(g⊙z)                      ``projected``
            g                                             ``identity``

Each parameter's gradient is its layer's local one, ∂L/∂W = gᵀx and ∂L/∂b = Σg for a Linear, ∂L/∂γ = Σ ∂L/∂y⊙z
and ∂L/∂β = Σ ∂L/∂y for a LayerNorm, with g the gradient that the surrogate backward pass delivers to the layer;
the last Linear (the head) therefore gets the true gradient, and every layer before it a surrogate one. The
rules are passed to the model's ``local_loss``; the model is never changed.

Exact limit: ``mode=transpose`` with ``ln=exact`` is backprop (the same products in the same order, up to
rounding). Any other combination has none: the estimate aligns with the true gradient only as far as the
forward weights come to align with B during training (random), or as the discarded LayerNorm components are
small (the energy fractions ``epx analyze layernorm`` measures).

The feedback matrices of ``random`` mode are estimator state: ``init(model, generator=...)`` draws them (a CPU
generator: the same matrices on every device), ``state_dict`` gives them by Linear name, ``load_state_dict``
restores them; checkpoints hold them. ``sign`` and ``transpose`` follow W and keep no state.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ep_core.bptt import Backprop
from ep_core.config import Config, option
from ep_core.errors import ConfigError
from ep_core.local import LN_RULES, BackwardRules, LayerNorm, Linear
from ep_core.protocols import Batch, GradientEstimate, LocalModel, matching_state
from ep_core.relax import parameter_gradient

MODES = ("random", "sign", "transpose")


def parse_overrides(text: str) -> tuple[tuple[str, str], ...]:
    """'ln_f=exact,blocks.0.*=projected' → (('ln_f', 'exact'), ('blocks.0.*', 'projected')); ConfigError if bad."""
    overrides = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, sep, rule = item.partition("=")
        if not sep or not pattern.strip():
            raise ConfigError("ln_at", f"expected LAYER=RULE items separated by commas, got {item!r}")
        if rule.strip() not in LN_RULES:
            raise ConfigError("ln_at", f"{rule.strip()!r} is not a LayerNorm rule; valid: {', '.join(LN_RULES)}")
        overrides.append((pattern.strip(), rule.strip()))
    return tuple(overrides)


def head_gradient_is_exact(estimator: FA, model: LocalModel, batch: Batch, seed: int) -> None:
    """Whatever the mode and the LayerNorm rules, the last Linear's weights get backprop's gradient: its input is
    the forward activation and its incoming gradient ∂L/∂logits is exact, since no feedback lies after it."""
    names = list(_linears(model))
    last = f"{names[-1]}.weight"
    estimate = estimator.estimate(model, batch, generator=torch.Generator().manual_seed(seed)).grads[last]
    exact = Backprop().estimate(model, batch, generator=torch.Generator().manual_seed(seed)).grads[last]
    error = float((estimate - exact).abs().max())
    tolerance = 1e3 * torch.finfo(exact.dtype).eps * (1 + float(exact.abs().max()))
    assert error <= tolerance, f"{last}: differs from backprop's gradient by {error:.3g}"


@dataclass(frozen=True)
class FAConfig(Config):
    mode: str = option("random", "feedback matrices: random (fixed, drawn at W's init scale), sign (sign(W) at "
                                 "W's scale) or transpose (W itself: backprop)", choices=MODES)
    ln: str = option("exact", "LayerNorm backward rule of every LayerNorm", choices=LN_RULES)
    ln_at: str = option("", "per-LayerNorm rules over --set ln, as LAYER=RULE,...; LAYER a name or glob, e.g. "
                            "ln_f=exact or blocks.0.*=projected (localgpt's: blocks.I.ln_1, blocks.I.ln_2, ln_f)")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_overrides(self.ln_at)


class FA:
    name: ClassVar[str] = "fa"
    Config: ClassVar[type[Config]] = FAConfig
    requires: ClassVar[type] = LocalModel
    exact_limit: ClassVar[str] = "mode=transpose with ln=exact (backprop)"
    conformance_limit: ClassVar[str | None] = "always"
    limit_settings: ClassVar[dict[str, str]] = {"mode": "transpose", "ln": "exact", "ln_at": ""}
    properties: ClassVar[tuple] = (head_gradient_is_exact,)

    def __init__(self, config: FAConfig | None = None):
        self.config = config or FAConfig()
        self.feedback: dict[str, torch.Tensor] | None = None

    def init(self, model: LocalModel, *, generator: torch.Generator) -> None:
        """Draw B ~ N(0, s²) for every Linear of ``model`` (random mode; the others keep no state)."""
        if self.config.mode != "random":
            self.feedback = {}
            return
        matrices = {}
        for name, layer in _linears(model).items():
            draw = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
            matrices[name] = (layer.std * draw).to(dtype=layer.weight.dtype, device=layer.weight.device)
        self.feedback = matrices

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._built())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.feedback = matching_state("fa", self._built(), state)

    def _built(self) -> dict[str, torch.Tensor]:
        if self.feedback is None:
            raise ConfigError("state", "fa's feedback matrices are not built yet: call init(model, generator=...) "
                                       "first (compare, train and the kit do)")
        return self.feedback

    def feedback_matrices(self, model: LocalModel) -> dict[str, torch.Tensor]:
        """B for every Linear of ``model`` under the configured mode."""
        linears = _linears(model)
        if self.config.mode == "transpose":
            return {name: layer.weight.detach() for name, layer in linears.items()}
        if self.config.mode == "sign":
            return {name: torch.sign(w) * w.pow(2).mean().sqrt()
                    for name, w in ((name, layer.weight.detach()) for name, layer in linears.items())}
        feedback = self._built()
        mismatched = [name for name, layer in linears.items()
                      if name not in feedback or feedback[name].shape != layer.weight.shape]
        if mismatched or len(feedback) != len(linears):
            raise ConfigError("state", f"fa's feedback matrices were built for another model (no match for "
                                       f"{', '.join(mismatched) or 'some layers'}); call init(model, generator=...) "
                                       "again")
        return feedback

    def layernorm_rules(self, model: LocalModel) -> dict[str, str]:
        """The rule of every LayerNorm: ``ln``, then each ``ln_at`` override in order (a later one wins)."""
        names = [name for name, layer in model.local_layers().items() if isinstance(layer, LayerNorm)]
        rules = dict.fromkeys(names, self.config.ln)
        for pattern, rule in parse_overrides(self.config.ln_at):
            matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
            if not matched:
                raise ConfigError("ln_at", f"{pattern!r} matches no LayerNorm of the model; its LayerNorms: "
                                           f"{', '.join(names)}")
            rules.update(dict.fromkeys(matched, rule))
        return rules

    def backward_rules(self, model: LocalModel) -> BackwardRules:
        return BackwardRules(feedback=self.feedback_matrices(model), layernorm=self.layernorm_rules(model))

    def estimate(self, model, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
        rules = self.backward_rules(model)
        return GradientEstimate(grads=parameter_gradient(model, lambda: model.local_loss(batch, rules)))


def _linears(model: LocalModel) -> dict[str, Linear]:
    return {name: layer for name, layer in model.local_layers().items() if isinstance(layer, Linear)}
