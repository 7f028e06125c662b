"""cet — an energy transformer for masked patch reconstruction, with a non-conservative attention knob.

An image X (B×C×H×W) is cut into N patches (p×p, stride p: 16 tokens for 28×28 with p=7). A random half of the
patches is masked (M = 1 on masked pixels) and the clamped input is x̄ = X ⊙ (1 − M). The state is (z, y): tokens
z (B×N×D) and the reconstruction y (B×C×H×W). With e = patches(x̄)·W_enc + pos the encoding of the visible
image, dec(z) = fold(z·W_dec + b_dec) the linear decoder, and ξ (K×D) the memories, the conservative energy is

    E_rest(z, y) = ½||z||² − ⟨z, e⟩                 encoder + positional: tokens pulled toward e
                 − ½ Σ_{i,μ} relu(ξ_μ · z_i)²       Hopfield memory
                 + ½||y − dec(z)||²                  decoder

and the force adds ordinary multi-head softmax attention (independent W_Q, W_K, W_V, W_O), which is not the
gradient of any energy:

    F_z = −∂E_rest/∂z + s·(Attn(z) − c·z),     F_y = −∂E_rest/∂y = dec(z) − y.

s = 0 is the conservative limit. With ``project=True`` each token is normalised (mean 0, std 1 over D) after
every step: Π(z, y) = (tokennorm(z), y). The cost is the squared error on masked pixels divided by their number.
The forces are written out analytically (``energy`` and ``attention`` are kept as the definitions they are
tested against), as

    F_z = [e − (1 + s·c)·z] + relu(z·ξᵀ)·ξ + patches(y − dec(z))·W_decᵀ + mix(z)·(s·W_O),

each product with the running sum fused into it, the attention's projections in one product and its softmax in
one fused kernel; e, [W_Q|W_K|W_V] and s·W_O are computed once per estimate (:meth:`CET.with_parameter_terms`),
since on a GPU a relaxation step costs about its number of kernels.
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

TOKEN_NORM_EPS = 1e-5
ENCODING = "encoding"
"""The batch entry that carries e = patches(x̄)·W_enc + pos (:meth:`CET.with_parameter_terms`)."""
PROJECTIONS = "qkv_weight"
"""The batch entry that carries [W_Q|W_K|W_V]."""
OUTPUT = "out_weight"
"""The batch entry that carries s·W_O."""
DECAY = "decay"
"""The batch entry that carries −(1 + s·c), the coefficient of z in the force."""


@dataclass(frozen=True)
class CETConfig(Config):
    s: float = option(1.0, "attention scale; 0 is the conservative limit", ge=0)
    c: float = option(1.0, "self-inhibition in the attention term s·(Attn(z) − c·z)", ge=0)
    project: bool = option(False, "token-normalise z (mean 0, std 1 per token) after every step")
    eps: float = option(0.2, "relaxation step size ε", gt=0)
    T1: int = option(120, "free-phase steps", ge=1)
    solver: str = solver_option()
    tol: float = tol_option()
    memory: int = memory_option()
    dim: int = option(64, "token width D", ge=1)
    heads: int = option(4, "attention heads", ge=1)
    head_dim: int = option(16, "width of each attention head", ge=1)
    memories: int = option(128, "Hopfield memories K", ge=1)
    image: int = option(28, "image height and width", ge=1)
    channels: int = option(1, "image channels", ge=1)
    patch: int = option(7, "patch size p", ge=1)
    stride: int = option(7, "patch stride", ge=1)
    mask_ratio: float = option(0.5, "fraction of patches masked", gt=0, lt=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch > self.image or (self.image - self.patch) % self.stride:
            raise ConfigError("stride", f"patches of {self.patch} with stride {self.stride} must tile an "
                                        f"image of {self.image} exactly")


def token_norm(z: torch.Tensor) -> torch.Tensor:
    mean = z.mean(dim=-1, keepdim=True)
    var = z.var(dim=-1, keepdim=True, unbiased=False)
    return (z - mean) / torch.sqrt(var + TOKEN_NORM_EPS)


class CET(nn.Module):
    Config: ClassVar[type[Config]] = CETConfig
    data: ClassVar[DataSpec] = DataSpec(kind="images", shape=lambda cfg: (cfg.channels, cfg.image, cfg.image),
                                        datasets=("fashionmnist",), batch_size=32)
    state_names: ClassVar[tuple[str, ...]] = ("z", "y")
    stacked_knobs: ClassVar[tuple[str, ...]] = ("s", "c")
    step_size_field: ClassVar[str] = "eps"

    def __init__(self, config: CETConfig | None = None, *, generator: torch.Generator):
        super().__init__()
        self.config = cfg = config or CETConfig()
        self.grid = (cfg.image - cfg.patch) // cfg.stride + 1
        self.tokens = self.grid**2
        patch_dim = cfg.channels * cfg.patch**2
        width = cfg.heads * cfg.head_dim

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        self.W_enc = normal(patch_dim, cfg.dim, std=1 / math.sqrt(patch_dim))
        self.pos = normal(self.tokens, cfg.dim, std=0.1)
        # Memory strength is kept small enough that −Σ relu(ξ·z)² cannot overpower the ½||z||² confinement:
        # with about half the memories active the Hessian's largest negative eigenvalue stays near −0.5.
        self.memories = normal(cfg.memories, cfg.dim, std=0.5 / math.sqrt(cfg.memories))
        self.W_dec = normal(cfg.dim, patch_dim, std=1 / math.sqrt(cfg.dim))
        self.b_dec = nn.Parameter(torch.zeros(patch_dim))
        self.W_Q = normal(cfg.dim, width, std=1 / math.sqrt(cfg.dim))
        self.W_K = normal(cfg.dim, width, std=1 / math.sqrt(cfg.dim))
        self.W_V = normal(cfg.dim, width, std=1 / math.sqrt(cfg.dim))
        self.W_O = normal(width, cfg.dim, std=1 / math.sqrt(width))
        register_knobs(self)

    @property
    def dynamics(self) -> Dynamics:
        cfg = self.config
        return Dynamics(eps=cfg.eps, T1=cfg.T1, solver=cfg.solver, tol=cfg.tol, memory=cfg.memory)

    def parameter_groups(self) -> dict[str, list[str]]:
        return {"attention": ["W_Q", "W_K", "W_V", "W_O"], "memory": ["memories"],
                "encoder": ["W_enc", "pos"], "decoder": ["W_dec", "b_dec"]}

    def loss(self, batch: Batch) -> torch.Tensor:
        return unrolled_loss(self, batch)

    # --- data ---------------------------------------------------------------------------------------------

    def prepare_batch(self, inputs: torch.Tensor, targets: torch.Tensor, *, generator: torch.Generator) -> Batch:
        """Mask a random ``mask_ratio`` of each image's patches (drawn from ``generator``)."""
        cfg = self.config
        self.data.check_images("cet", cfg, inputs)
        batch = inputs.shape[0]
        masked = max(1, round(cfg.mask_ratio * self.tokens))
        order = torch.argsort(torch.rand(batch, self.tokens, generator=generator), dim=1)
        token_mask = torch.zeros(batch, self.tokens)
        token_mask.scatter_(1, order[:, :masked], 1.0)
        token_mask = token_mask.to(inputs)
        patch_dim = cfg.channels * cfg.patch**2
        pixel_mask = self._fold(token_mask[:, :, None].expand(-1, -1, patch_dim)).clamp(max=1.0)
        return {"images": inputs, "mask": pixel_mask, "clamped": inputs * (1 - pixel_mask), "labels": targets}

    def _tiles(self) -> bool:
        """Whether the patches tile the image (stride = patch, no remainder): then cutting and pasting them are
        reshapes, where F.unfold and F.fold launch a kernel per image on CUDA (most of a force evaluation's time
        on a GPU)."""
        cfg = self.config
        return cfg.stride == cfg.patch and cfg.image % cfg.patch == 0

    def _unfold(self, images: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → B×N×(C·p·p), patches in row-major order, each channel-major: F.unfold's layout."""
        cfg = self.config
        if not self._tiles():
            return F.unfold(images, cfg.patch, stride=cfg.stride).transpose(1, 2)
        b, grid, p = images.shape[0], cfg.image // cfg.patch, cfg.patch
        tiles = images.reshape(b, cfg.channels, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5)
        return tiles.reshape(b, grid * grid, cfg.channels * p * p)

    def _fold(self, patches: torch.Tensor) -> torch.Tensor:
        """The inverse layout, summing overlaps as F.fold does."""
        cfg = self.config
        if not self._tiles():
            return F.fold(patches.transpose(1, 2), (cfg.image, cfg.image), cfg.patch, stride=cfg.stride)
        b, grid, p = patches.shape[0], cfg.image // cfg.patch, cfg.patch
        tiles = patches.reshape(b, grid, grid, cfg.channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return tiles.reshape(b, cfg.channels, cfg.image, cfg.image)

    # --- the pieces of the energy and the force ------------------------------------------------------------

    def encoding(self, batch: Batch) -> torch.Tensor:
        """e = patches(x̄)·W_enc + pos."""
        return self._unfold(batch["clamped"]) @ self.W_enc + self.pos

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._fold(z @ self.W_dec + self.b_dec)

    def attention(self, z: torch.Tensor) -> torch.Tensor:
        """Attn(z): multi-head softmax attention with independent Q, K, V, O projections."""
        cfg = self.config
        b, n, _ = z.shape

        def split(w: torch.Tensor) -> torch.Tensor:
            return (z @ w).view(b, n, cfg.heads, cfg.head_dim).transpose(1, 2)

        scores = split(self.W_Q) @ split(self.W_K).transpose(-1, -2) / math.sqrt(cfg.head_dim)
        mixed = torch.softmax(scores, dim=-1) @ split(self.W_V)
        return mixed.transpose(1, 2).reshape(b, n, cfg.heads * cfg.head_dim) @ self.W_O

    def energy(self, state: State, batch: Batch) -> torch.Tensor:
        """E_rest(z, y), summed over the batch."""
        z, y = state
        memory = F.relu(z @ self.memories.T)
        return (0.5 * z.pow(2).sum() - (z * self.encoding(batch)).sum()
                - 0.5 * memory.pow(2).sum() + 0.5 * (y - self.decode(z)).pow(2).sum())

    def parameter_term_inputs(self) -> Batch:
        return {}

    def with_parameter_terms(self, batch: Batch) -> Batch:
        """The batch carrying e, [W_Q|W_K|W_V], s·W_O and −(1 + s·c), computed once (with their graph under
        autograd); s and c are read from buffers, so that models differing in them stack
        (:class:`~ep_core.protocols.StacksKnobs`)."""
        s, c = knob(self, "s", self.W_O), knob(self, "c", self.W_O)
        return {**batch, ENCODING: self.encoding(batch), OUTPUT: s * self.W_O, DECAY: -(1 + s * c),
                PROJECTIONS: torch.cat([self.W_Q, self.W_K, self.W_V], dim=1)}

    def _terms(self, batch: Batch) -> Batch:
        return batch if OUTPUT in batch else self.with_parameter_terms(batch)

    def mix(self, z: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
        """softmax(QKᵀ/√d_h)·V per head, heads side by side: (B·N) × (heads·head_dim); ``projections`` is
        [W_Q|W_K|W_V]. One fused kernel (F.scaled_dot_product_attention); a jvp through it runs under the math
        backend, since the fused ones have no forward-mode derivative (:func:`ep_core.analysis.antisymmetry`)."""
        cfg = self.config
        b, n, _ = z.shape
        q, k, v = (z @ projections).view(b, n, 3, cfg.heads, cfg.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mixed = F.scaled_dot_product_attention(q, k, v)
        return mixed.transpose(1, 2).reshape(b * n, cfg.heads * cfg.head_dim)

    def init_state(self, batch: Batch) -> State:
        return self.project((self._terms(batch)[ENCODING], batch["clamped"]))

    def force(self, state: State, batch: Batch) -> State:
        z, y = state
        terms = self._terms(batch)
        force_z, force_y = self._conservative_force(z, y, terms)
        if self.config.s:
            force_z = torch.addmm(force_z, self.mix(z, terms[PROJECTIONS]), terms[OUTPUT])
        return force_z.view_as(z), force_y

    def nonconservative(self, state: State, batch: Batch) -> State:
        z, y = state
        return self._attention_part(z, self._terms(batch)), torch.zeros_like(y)

    def split_force(self, state: State, batch: Batch) -> tuple[State, State]:
        """(F, N) with one attention (:class:`~ep_core.protocols.SplitsForce`)."""
        z, y = state
        terms = self._terms(batch)
        force_z, force_y = self._conservative_force(z, y, terms)
        part = self._attention_part(z, terms)
        return (force_z.view_as(z).add_(part), force_y), (part, torch.zeros_like(y))

    def conservative(self, state: State, batch: Batch) -> State:
        """F − N = −∇E_rest, without the attention (:class:`~ep_core.protocols.DeclaresConservative`)."""
        z, y = state
        force_z, force_y = self._conservative_force(z, y, self._terms(batch))
        return force_z.view_as(z), force_y

    def _conservative_force(self, z: torch.Tensor, y: torch.Tensor, terms: Batch) -> tuple[torch.Tensor, ...]:
        """(−∂E_rest/∂z flattened to (B·N)×D, −∂E_rest/∂y)."""
        flat = z.reshape(-1, z.shape[-1])
        reconstruction_error = y - self._fold(torch.addmm(self.b_dec, flat, self.W_dec).view(
            z.shape[0], self.tokens, -1))
        force_z = torch.addcmul(terms[ENCODING], z, terms[DECAY]).reshape(flat.shape)
        force_z = torch.addmm(force_z, F.relu(flat @ self.memories.T), self.memories)
        force_z = torch.addmm(force_z, self._unfold(reconstruction_error).reshape(flat.shape[0], -1), self.W_dec.T)
        return force_z, -reconstruction_error

    def _attention_part(self, z: torch.Tensor, terms: Batch) -> torch.Tensor:
        if not self.config.s:
            return torch.zeros_like(z)
        return (self.mix(z, terms[PROJECTIONS]) @ terms[OUTPUT]).view_as(z)

    def project(self, state: State) -> State:
        if not self.config.project:
            return state
        z, y = state
        return token_norm(z), y

    def cost(self, state: State, batch: Batch) -> torch.Tensor:
        _, y = state
        mask = batch["mask"]
        return ((y - batch["images"]).pow(2) * mask).sum() / mask.sum()
