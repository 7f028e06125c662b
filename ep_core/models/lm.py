"""lm — a character language model whose causal attention is a damped equilibrium block.

Tokens u (B×T) are embedded as x_in = E_tok[u] + E_pos (clamped: the boundary condition of the dynamics). The
state is z (B×T×C) and the force is

    F(z) = −(z − x_in) + s·(Attn(z) − c·z),

with Attn the causal multi-head softmax attention O·softmax(QKᵀ/√d_h, causal)·V of independent projections
W_Q, W_K, W_V, W_O: not the gradient of any energy, so s > 0 is non-conservative and s = 0 is the conservative
limit. The damping c > 0 makes the block a contraction for moderate s, so there is a stable fixed point z*. The
free phase starts from z = x_in. The read-out is logits = z*·W_head and the cost is the next-character
cross-entropy, averaged over the B×T positions.

The embeddings are fixed random tables (std ``embed_std``) unless ``learn_embeddings``; seed 002 trains only the
attention and the read-out.

Two departures from seed 002, both switchable back (``readout_norm=false``, ``gain_bound=none``), and neither
active at initialisation for seeds 0–4 except the read-out's normalisation:

- The read-out is logits = n(z*)·W_head with n(z) = z/rms(z) per position, so the cost does not reward a larger
  z. The first position attends only to itself, so its block of the force's Jacobian is
  −(1 + s·c)I + s·W_V·W_O; the plain read-out lets training grow W_V·W_O until an eigenvalue crosses 1 + s·c
  and the fixed point disappears (measured: within 15–40 AdamW steps at lr 3e-4…3e-3, for aep and bptt alike).
- ``gain_bound`` β scales the attention by κ = min(1, β(1 + s·c)/(s·λ_max(sym(W_V·W_O)))), which keeps that
  block's symmetric part negative definite whatever training does to W_V and W_O. At initialisation
  λ_max(sym(W_V·W_O)) ≈ 1.6 < 0.9·2, so κ = 1 there.

Computed as F(z) = [x_in − (1 + s·c)·z] + mix(z)·(s·κ·W_O), mix(z) = softmax(QKᵀ/√d_h, causal)·V with
[Q|K|V] = z·[W_Q|W_K|W_V]: the same function in five kernels (one projection, one fused attention, one copy out of
the heads, the output product with the sum fused into it, one axpy). x_in, [W_Q|W_K|W_V] and s·κ·W_O are terms
of the batch and the parameters alone, computed once per estimate (:meth:`LM.with_parameter_terms`): on a GPU a
relaxation step costs about its number of kernels. s and c are read from buffers (``knob_s``, ``knob_c``), so that
models differing in them stack (:class:`~ep_core.protocols.StacksKnobs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ep_core.batching import knob, register_knobs
from ep_core.config import Config, ConfigError, option
from ep_core.protocols import Batch, DataSpec, Dynamics, State
from ep_core.relax import unrolled_loss
from ep_core.solvers import memory_option, solver_option, tol_option

GAIN = "gain"
"""The batch entry that carries κ through an unrolled free phase (:meth:`LM.with_parameter_terms`)."""
INPUT = "x_in"
"""The batch entry that carries x_in = E_tok[u] + E_pos (:meth:`LM.with_parameter_terms`)."""
PROJECTIONS = "qkv_weight"
"""The batch entry that carries [W_Q|W_K|W_V] (C × 3C)."""
OUTPUT = "out_weight"
"""The batch entry that carries s·κ·W_O, the output projection with the attention's scale and gain."""
DECAY = "decay"
"""The batch entry that carries −(1 + s·c), the coefficient of z in the force."""
GAIN_DIRECTION = "gain_direction"
"""The batch entry that carries u, from which a captured estimate computes κ (:meth:`LM.parameter_term_inputs`)."""
READOUT_NORM_EPS = 1e-8
"""Against a zero token; far below the mean square of z, which is about embed_std² (4e-4 by default)."""


@dataclass(frozen=True)
class LMConfig(Config):
    s: float = option(1.0, "attention scale; 0 is the conservative limit", ge=0)
    c: float = option(1.0, "damping in the attention term s·(Attn(z) − c·z)", ge=0)
    eps: float = option(0.1, "relaxation step size ε", gt=0)
    T1: int = option(120, "free-phase steps", ge=1)
    solver: str = solver_option()
    tol: float = tol_option()
    memory: int = memory_option()
    context: int = option(64, "characters per sequence T", ge=1)
    width: int = option(128, "embedding width C", ge=1)
    heads: int = option(4, "attention heads (each C/heads wide)", ge=1)
    vocab: int | None = option(None, "vocabulary size; taken from the dataset when unset", ge=1, optional=True)
    embed_std: float = option(0.02, "standard deviation of the token and position embeddings", gt=0)
    learn_embeddings: bool = option(False, "train the embeddings too (group 'embedding')")
    readout_norm: bool = option(True, "read out z/rms(z) instead of z (false: seed 002's plain z·W_head)")
    gain_bound: float | None = option(0.9, "keep s·λ_max(sym(W_V·W_O)) ≤ this·(1 + s·c) by scaling the attention; "
                                           "none: unbounded, as in seed 002", gt=0, lt=1, optional=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width % self.heads:
            raise ConfigError("heads", f"width {self.width} must be divisible by heads={self.heads}")


class LM(nn.Module):
    Config: ClassVar[type[Config]] = LMConfig
    data: ClassVar[DataSpec] = DataSpec(kind="text", shape=lambda cfg: (cfg.context,), datasets=("shakespeare",),
                                        batch_size=16, from_data=lambda dataset: {"vocab": dataset.vocab_size})
    state_names: ClassVar[tuple[str, ...]] = ("z",)
    stacked_knobs: ClassVar[tuple[str, ...]] = ("s", "c")
    step_size_field: ClassVar[str] = "eps"

    def __init__(self, config: LMConfig | None = None, *, generator: torch.Generator):
        super().__init__()
        self.config = cfg = config or LMConfig()
        if cfg.vocab is None:
            raise ConfigError("vocab", "lm needs a vocabulary size: load it with a text dataset, or set vocab=N")
        self.head_dim = cfg.width // cfg.heads

        def normal(*shape: int, std: float) -> torch.Tensor:
            return torch.randn(*shape, generator=generator) * std

        embeddings = {"token_embedding": normal(cfg.vocab, cfg.width, std=cfg.embed_std),
                      "position_embedding": normal(cfg.context, cfg.width, std=cfg.embed_std)}
        for name, table in embeddings.items():
            if cfg.learn_embeddings:
                self.register_parameter(name, nn.Parameter(table))
            else:
                self.register_buffer(name, table)
        self.W_Q = nn.Parameter(normal(cfg.width, cfg.width, std=1 / math.sqrt(cfg.width)))
        self.W_K = nn.Parameter(normal(cfg.width, cfg.width, std=1 / math.sqrt(cfg.width)))
        self.W_V = nn.Parameter(normal(cfg.width, cfg.width, std=1 / math.sqrt(cfg.width)))
        self.W_O = nn.Parameter(normal(cfg.width, cfg.width, std=1 / math.sqrt(cfg.width)))
        self.W_head = nn.Parameter(normal(cfg.width, cfg.vocab, std=1 / math.sqrt(cfg.width)))
        register_knobs(self)
        self._gain_cache: tuple[tuple, torch.Tensor] | None = None
        self._direction_cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def dynamics(self) -> Dynamics:
        cfg = self.config
        return Dynamics(eps=cfg.eps, T1=cfg.T1, solver=cfg.solver, tol=cfg.tol, memory=cfg.memory)

    def parameter_groups(self) -> dict[str, list[str]]:
        groups = {"attention": ["W_Q", "W_K", "W_V", "W_O"], "readout": ["W_head"]}
        if self.config.learn_embeddings:
            groups["embedding"] = ["token_embedding", "position_embedding"]
        return groups

    def loss(self, batch: Batch) -> torch.Tensor:
        return unrolled_loss(self, batch)

    def prepare_batch(self, inputs: torch.Tensor, targets: torch.Tensor, *, generator: torch.Generator) -> Batch:
        self.data.check_tokens("lm", self.config, inputs, targets, vocab=self.config.vocab)
        device = self.W_head.device
        return {"tokens": inputs.to(device), "targets": targets.to(device)}

    def embed(self, batch: Batch) -> torch.Tensor:
        """x_in = E_tok[u] + E_pos."""
        tokens = batch["tokens"]
        return self.token_embedding[tokens] + self.position_embedding[: tokens.shape[1]]

    def parameter_term_inputs(self) -> Batch:
        """u, the top eigenvector of sym(W_V·W_O): what κ needs that a CUDA graph cannot record (an
        eigendecomposition reads its status back), computed eagerly and passed in with the batch."""
        return {GAIN_DIRECTION: self.top_direction()} if self.bounded else {}

    def with_parameter_terms(self, batch: Batch) -> Batch:
        """The batch carrying x_in, [W_Q|W_K|W_V], κ, s·κ·W_O and −(1 + s·c), computed once for a whole estimate
        or unrolled free phase (with their graph under autograd) instead of at every step; κ from the batch's u
        when it carries one."""
        if self.bounded:
            direction = batch.get(GAIN_DIRECTION)
            gain = self.gain_scale() if direction is None else self._gain_scale(direction)
        else:
            gain = torch.ones((), dtype=self.W_O.dtype, device=self.W_O.device)
        s, c = self._knobs()
        return {**batch, INPUT: self.embed(batch), GAIN: gain,
                PROJECTIONS: torch.cat([self.W_Q, self.W_K, self.W_V], dim=1),
                OUTPUT: (s * gain) * self.W_O, DECAY: -(1 + s * c)}

    def _knobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return knob(self, "s", self.W_O), knob(self, "c", self.W_O)

    def _terms(self, batch: Batch) -> Batch:
        return batch if OUTPUT in batch else self.with_parameter_terms(batch)

    def attention(self, z: torch.Tensor) -> torch.Tensor:
        """Attn(z) = κ·O·softmax(QKᵀ/√d_h, causal)·V per head, written out as defined: what :meth:`force` and
        :meth:`nonconservative` compute in fewer kernels, and are tested against."""
        b, t, width = z.shape
        heads, head_dim = self.config.heads, self.head_dim

        def split(w: torch.Tensor) -> torch.Tensor:
            return (z @ w).view(b, t, heads, head_dim).transpose(1, 2)

        causal = torch.ones(t, t, dtype=torch.bool, device=z.device).tril()
        scores = (split(self.W_Q) @ split(self.W_K).transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(
            ~causal, float("-inf"))
        mixed = torch.softmax(scores, dim=-1) @ split(self.W_V)
        return self.gain_scale() * (mixed.transpose(1, 2).reshape(b, t, width) @ self.W_O)

    def mix(self, z: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
        """softmax(QKᵀ/√d_h, causal)·V per head, heads side by side: (B·T) × C; ``projections`` is
        [W_Q|W_K|W_V]. One fused kernel (F.scaled_dot_product_attention) for the scores, mask, softmax and mixing;
        its fused backends have no forward-mode derivative, so a jvp through it runs under the math backend
        (:func:`ep_core.analysis.antisymmetry`)."""
        b, t, width = z.shape
        heads, head_dim = self.config.heads, self.head_dim
        q, k, v = (z @ projections).view(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return mixed.transpose(1, 2).reshape(b * t, width)

    @property
    def bounded(self) -> bool:
        return self.config.gain_bound is not None and self.config.s != 0

    def gain_scale(self) -> torch.Tensor | float:
        """κ = min(1, bound·(1 + s·c) / (s·λ_max(sym(W_V·W_O)))), or 1 without a bound.

        The first position attends only to itself, so its block of J_F is −(1 + s·c)I + s·κ·W_V·W_O: with
        s·κ·λ_max(sym(W_V·W_O)) < 1 + s·c its symmetric part is negative definite and that block contracts.
        Training otherwise drives this eigenvalue past 1 + s·c (module docstring).

        λ_max = uᵀ·sym(W_V·W_O)·u with u its eigenvector (:meth:`top_direction`): the value exactly, and, since
        dλ = uᵀ·d(sym(W_V·W_O))·u for a simple eigenvalue, its derivative too, so κ is differentiated through
        plain products. κ depends on the parameters only, yet every force evaluation needs it, so outside
        autograd it is kept for as long as W_V and W_O are the same tensors, unmodified (their ``_version``
        counts in-place updates such as optimizer steps). Under autograd it is recomputed from the kept u,
        since it must be part of that graph.
        """
        if not self.bounded:
            return 1.0
        if torch.is_grad_enabled():
            return self._gain_scale()
        key = self._parameter_key()
        if self._gain_cache is None or self._gain_cache[0] != key:
            self._gain_cache = (key, self._gain_scale())
        return self._gain_cache[1]

    def top_direction(self) -> torch.Tensor:
        """u, the unit eigenvector of sym(W_V·W_O)'s largest eigenvalue; one eigendecomposition per version of
        W_V and W_O."""
        key = self._parameter_key()
        if self._direction_cache is None or self._direction_cache[0] != key:
            self._direction_cache = (key, self._top_eigenvector())
        return self._direction_cache[1]

    def _parameter_key(self) -> tuple:
        return tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in (self.W_V, self.W_O))

    def _top_eigenvector(self) -> torch.Tensor:
        with torch.no_grad():
            value_output = self.W_V @ self.W_O
            return torch.linalg.eigh(0.5 * (value_output + value_output.T))[1][:, -1].contiguous()

    def _gain_scale(self, direction: torch.Tensor | None = None) -> torch.Tensor:
        u = self.top_direction() if direction is None else direction
        value_output = self.W_V @ self.W_O
        top = u @ value_output @ u
        s, c = self._knobs()
        limit = self.config.gain_bound * (1 + s * c) / s
        return torch.clamp(limit / top.clamp_min(torch.finfo(top.dtype).tiny), max=1.0)

    def logits(self, state: State) -> torch.Tensor:
        (z,) = state
        return self._readout_input(z)[0] @ self.W_head

    def _readout_input(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n(z) = z·r, r = (mean(z²) + eps)^(−1/2)) with the read-out's normalisation, (z, None) without."""
        if not self.config.readout_norm:
            return z, None
        r = torch.rsqrt(z.pow(2).mean(dim=-1, keepdim=True) + READOUT_NORM_EPS)
        return z * r, r

    def init_state(self, batch: Batch) -> State:
        return (self.embed(batch),)

    def force(self, state: State, batch: Batch) -> State:
        (z,) = state
        terms = self._terms(batch)
        linear = self._conservative_force(z, terms)
        if not self.config.s:
            return (linear,)
        return (torch.addmm(linear.reshape(-1, z.shape[-1]), self.mix(z, terms[PROJECTIONS]),
                            terms[OUTPUT]).view_as(z),)

    def nonconservative(self, state: State, batch: Batch) -> State:
        """N(z) = s·Attn(z): F − N = x_in − (1 + s·c)·z is the gradient flow of a quadratic energy."""
        (z,) = state
        return (self._attention_part(z, self._terms(batch)),)

    def split_force(self, state: State, batch: Batch) -> tuple[State, State]:
        """(F(z), N(z)) with one attention (:class:`~ep_core.protocols.SplitsForce`)."""
        (z,) = state
        terms = self._terms(batch)
        part = self._attention_part(z, terms)
        return (self._conservative_force(z, terms).add_(part),), (part,)

    def conservative(self, state: State, batch: Batch) -> State:
        """F − N = x_in − (1 + s·c)·z, without the attention (:class:`~ep_core.protocols.DeclaresConservative`)."""
        (z,) = state
        return (self._conservative_force(z, self._terms(batch)),)

    def _conservative_force(self, z: torch.Tensor, terms: Batch) -> torch.Tensor:
        """x_in − (1 + s·c)·z, the decay folded into one buffer."""
        return torch.addcmul(terms[INPUT], z, terms[DECAY])

    def _attention_part(self, z: torch.Tensor, terms: Batch) -> torch.Tensor:
        if not self.config.s:
            return torch.zeros_like(z)
        return (self.mix(z, terms[PROJECTIONS]) @ terms[OUTPUT]).view_as(z)

    def project(self, state: State) -> State:
        return state

    def cost_gradient(self, state: State, batch: Batch) -> State:
        """∇_z C written out (:class:`~ep_core.protocols.DifferentiatesCost`). With p = softmax(logits) and y the
        one-hot targets over the M = B·T positions, ∂C/∂logits = (p − y)/M, so g_n = (p − y)·W_headᵀ/M. The
        normalisation n = z·r, r = (mean(z²) + eps)^(−1/2), has the symmetric Jacobian r·(I − n·nᵀ/C), so

            g_z = r·(g_n − n·mean(n ⊙ g_n)),

        or g_z = g_n without it."""
        (z,) = state
        n, r = self._readout_input(z)
        targets = batch["targets"].reshape(-1, 1)
        vocabulary = torch.arange(self.W_head.shape[1], device=z.device)
        # y as a comparison, not a scatter: a scatter has no vmap batching rule, and a stack vmaps this.
        probabilities = torch.softmax((n @ self.W_head).reshape(targets.shape[0], -1), dim=-1)
        residual = probabilities.sub_((targets == vocabulary).to(probabilities.dtype))
        g_n = (residual @ self.W_head.T).view_as(z).div_(targets.shape[0])
        if r is None:
            return (g_n,)
        return (g_n.sub_(n * (n * g_n).mean(dim=-1, keepdim=True)).mul_(r),)

    def cost(self, state: State, batch: Batch) -> torch.Tensor:
        logits = self.logits(state)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1))
