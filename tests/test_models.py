"""The reference models: forces against energies, projection, masking, fixed points, parameter groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ep_core.models.cet import CET, TOKEN_NORM_EPS, CETConfig, token_norm
from ep_core.models.resmlp import ResMLP, ResMLPConfig
from ep_core.models.toy import Toy, ToyConfig
from ep_core.protocols import EquilibriumModel, ResidualModel
from ep_core.relax import free_phase, relax

SMALL = {"dim": 16, "heads": 2, "head_dim": 8, "memories": 16}


def cet(seed: int = 0, **overrides) -> CET:
    config = CETConfig(**{**SMALL, **overrides})
    return CET(config, generator=torch.Generator().manual_seed(seed)).double()


def image_batch(model: CET, seed: int, size: int = 4):
    g = torch.Generator().manual_seed(1000 + seed)
    cfg = model.config
    images = torch.rand(size, cfg.channels, cfg.image, cfg.image, generator=g, dtype=torch.float64)
    return model.prepare_batch(images, torch.zeros(size, dtype=torch.long), generator=g)


def random_state(model: CET, batch, seed: int):
    g = torch.Generator().manual_seed(2000 + seed)
    size = batch["images"].shape[0]
    z = torch.randn(size, model.tokens, model.config.dim, generator=g, dtype=torch.float64)
    y = torch.randn(batch["images"].shape, generator=g, dtype=torch.float64)
    return z, y


def minus_energy_gradient(model, state, batch):
    return tuple(-g for g in torch.func.grad(lambda s: model.energy(s, batch))(state))


def max_gap(a, b) -> float:
    return max(float((ai - bi).detach().abs().max()) for ai, bi in zip(a, b, strict=True))


# --- cet: force and energy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_cet_force_is_minus_energy_gradient_at_s0(seed):
    model = cet(seed, s=0.0)
    batch = image_batch(model, seed)
    state = random_state(model, batch, seed)
    assert max_gap(model.force(state, batch), minus_energy_gradient(model, state, batch)) < 1e-10


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("s", "c"), [(1.0, 1.0), (0.3, 0.0), (2.5, 0.7)])
def test_cet_force_adds_exactly_the_attention_term(seed, s, c):
    model = cet(seed, s=s, c=c)
    batch = image_batch(model, seed)
    state = random_state(model, batch, seed)
    z = state[0]
    force = model.force(state, batch)
    conservative = minus_energy_gradient(model, state, batch)
    assert max_gap((force[0] - conservative[0],), (s * (model.attention(z) - c * z),)) < 1e-10
    assert max_gap((force[1],), (conservative[1],)) < 1e-10
    # what ``nonconservative`` leaves out is a gradient: of E_rest + ½·s·c·||z||²
    rest = tuple(f - n for f, n in zip(force, model.nonconservative(state, batch)))
    shifted = torch.func.grad(lambda st: model.energy(st, batch) + 0.5 * s * c * st[0].pow(2).sum())(state)
    assert max_gap(rest, tuple(-g for g in shifted)) < 1e-10
    # split_force gives both from one evaluation
    split_force, split_part = model.split_force(state, batch)
    assert max_gap(split_force, force) < 1e-12 and max_gap(split_part, model.nonconservative(state, batch)) < 1e-12


def test_cet_attention_is_not_conservative():
    """s > 0 makes the Jacobian of F_z asymmetric, which is what makes naive EP biased on cet."""
    model = cet(0, s=1.0)
    batch = image_batch(model, 0, size=1)
    z, y = random_state(model, batch, 0)
    jacobian = torch.autograd.functional.jacobian(lambda v: model.force((v, y), batch)[0], z)
    jacobian = jacobian.reshape(z.numel(), z.numel())
    assert float((jacobian - jacobian.T).abs().max()) > 1e-3


# --- toy ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_toy_force_is_minus_energy_gradient_when_conservative(seed):
    g = torch.Generator().manual_seed(seed)
    config = ToyConfig(units=7, inputs=3, outputs=2, conservative=True, coupling=0.6)
    model = Toy(config, generator=g).double()
    batch = model.make_batch(4, generator=g)
    state = (2 * torch.randn(4, 7, generator=g, dtype=torch.float64),)
    assert max_gap(model.force(state, batch), minus_energy_gradient(model, state, batch)) < 1e-12


def test_nonconservative_toy_has_no_energy_and_an_asymmetric_coupling():
    model = Toy(ToyConfig(conservative=False), generator=torch.Generator().manual_seed(0)).double()
    batch = model.make_batch(2, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="no energy"):
        model.energy(model.init_state(batch), batch)
    W = model.coupling_matrix().detach()
    assert float((W - W.T).abs().max()) > 1e-3


def test_toy_coupling_has_the_configured_spectral_norm():
    for conservative in (True, False):
        config = ToyConfig(coupling=0.35, conservative=conservative)
        model = Toy(config, generator=torch.Generator().manual_seed(3))
        spectral_norm = float(torch.linalg.matrix_norm(model.W.detach().double(), ord=2))
        assert spectral_norm == pytest.approx(0.35, rel=1e-5)


# --- cet: projection, masking, fixed point ------------------------------------------------------------------

def assert_token_normalised(z: torch.Tensor, tol: float) -> None:
    z = z.detach()
    assert float(z.mean(dim=-1).abs().max()) < 1e-12
    assert float((z.std(dim=-1, unbiased=False) - 1).abs().max()) < tol


@pytest.mark.parametrize("seed", range(3))
def test_cet_projection_normalises_every_token(seed):
    model = cet(seed, project=True)
    batch = image_batch(model, seed)
    z, y = random_state(model, batch, seed)
    projected = model.project((3 + 5 * z, y))
    assert_token_normalised(projected[0], 1e-6)
    assert projected[1] is y
    # std 1 up to the norm's regulariser: std² = var / (var + TOKEN_NORM_EPS) exactly, for any token
    small = 0.05 * z
    variance = small.var(dim=-1, unbiased=False)
    std = model.project((small, y))[0].std(dim=-1, unbiased=False)
    assert torch.allclose(std, torch.sqrt(variance / (variance + TOKEN_NORM_EPS)), rtol=0, atol=1e-12)
    # the free phase starts projected and stays projected
    encoded = model.encoding(batch).detach()
    assert torch.allclose(model.init_state(batch)[0], token_norm(encoded), rtol=0, atol=1e-12)
    assert_token_normalised(relax(model, batch, model.init_state(batch), 5, phase="free").state[0], 1e-4)
    unprojected = cet(seed, project=False)
    assert unprojected.project((z, y))[0] is z


@pytest.mark.parametrize("mask_ratio", [0.5, 0.25, 0.75])
def test_cet_mask_covers_exactly_mask_ratio_of_the_patches(mask_ratio):
    model = CET(CETConfig(mask_ratio=mask_ratio), generator=torch.Generator().manual_seed(0))  # 16 patches
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    batch = model.prepare_batch(images, torch.zeros(8), generator=torch.Generator().manual_seed(2))
    mask = batch["mask"]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    patches = F.unfold(mask, 7, stride=7)  # (B, 49, 16): one column per patch
    per_patch = patches.mean(dim=1)
    assert set(per_patch.unique().tolist()) <= {0.0, 1.0}  # a patch is masked entirely or not at all
    assert per_patch.sum(dim=1).tolist() == [mask_ratio * 16] * 8
    assert float(mask.mean()) == pytest.approx(mask_ratio)
    assert torch.equal(batch["clamped"], images * (1 - mask))
    assert len({tuple(row.tolist()) for row in per_patch}) > 1  # each image gets its own mask


def test_cet_mask_follows_the_generator():
    model = CET(CETConfig(), generator=torch.Generator().manual_seed(0))
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))

    def masks(seed: int) -> torch.Tensor:
        batch = model.prepare_batch(images, torch.zeros(4), generator=torch.Generator().manual_seed(seed))
        return batch["mask"]

    assert torch.equal(masks(5), masks(5)) and not torch.equal(masks(5), masks(6))


def test_cet_rejects_images_of_the_wrong_shape():
    model = cet()
    with pytest.raises(ValueError, match="image/channels"):
        model.prepare_batch(torch.rand(2, 3, 32, 32), torch.zeros(2), generator=torch.Generator())


@pytest.mark.parametrize("seed", range(2))
def test_cet_default_config_reaches_its_fixed_point(seed):
    model = CET(CETConfig(T1=400), generator=torch.Generator().manual_seed(seed)).double()  # else defaults
    assert model.config.s == 1.0 and model.config.dim == 64 and model.tokens == 16
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    batch = model.prepare_batch(images, torch.zeros(4), generator=torch.Generator().manual_seed(seed))
    assert free_phase(model, batch).residual < 1e-6


# --- protocol and parameter groups --------------------------------------------------------------------------

@pytest.mark.parametrize("model", [
    cet(),
    CET(CETConfig(), generator=torch.Generator().manual_seed(0)),
    Toy(ToyConfig(conservative=True), generator=torch.Generator().manual_seed(0)),
    Toy(ToyConfig(conservative=False), generator=torch.Generator().manual_seed(0)),
    ResMLP(ResMLPConfig(), generator=torch.Generator().manual_seed(0)),
], ids=["cet-small", "cet", "toy", "toy-nonconservative", "resmlp"])
def test_parameter_groups_cover_every_parameter_once(model):
    assert isinstance(model, ResidualModel if isinstance(model, ResMLP) else EquilibriumModel)
    members = [name for group in model.parameter_groups().values() for name in group]
    assert sorted(members) == sorted(name for name, _ in model.named_parameters())
    assert len(members) == len(set(members))


@pytest.mark.parametrize("settings", [{}, {"channels": 3, "image": 32, "patch": 4, "stride": 4},
                                      {"patch": 7, "stride": 3, "image": 28}])
def test_cet_patches_are_exactly_f_unfold_and_f_fold(settings):
    """Tiling patches are cut and pasted by reshapes (F.unfold and F.fold launch a kernel per image on CUDA);
    the layout must be theirs, bit for bit, and overlapping patches still go through them."""
    cfg = CETConfig(**settings)
    model = CET(cfg, generator=torch.Generator().manual_seed(0)).double()
    images = torch.randn(3, cfg.channels, cfg.image, cfg.image, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    patches = model._unfold(images)
    assert torch.equal(patches, F.unfold(images, cfg.patch, stride=cfg.stride).transpose(1, 2))
    folded = F.fold(patches.transpose(1, 2), (cfg.image, cfg.image), cfg.patch, stride=cfg.stride)
    assert torch.equal(model._fold(patches), folded)


def protocol_members(protocol: type) -> set[str]:
    """The names a runtime protocol checks: its annotations and functions, and those of the protocols it extends."""
    names: set[str] = set()
    for base in protocol.__mro__:
        if base is object or not getattr(base, "_is_protocol", False) or base.__name__ in ("Protocol", "Generic"):
            continue
        names |= {name for name in base.__dict__.get("__annotations__", {}) if not name.startswith("_")}
        names |= {name for name, value in vars(base).items() if not name.startswith("_") and callable(value)}
    return names


@pytest.mark.parametrize("name", ["cet", "lm", "toy", "resmlp", "localgpt"])
def test_every_builtin_model_meets_its_protocols_as_python_3_12_checks_them(name):
    """Python 3.12 checks a runtime protocol with inspect.getattr_static, which does not see a Module's parameters,
    buffers and submodules: a protocol member that a model holds as one would make isinstance False there."""
    import inspect

    from ep_core import protocols
    from ep_core.plugins import load
    from ep_core.session import build_model

    model = build_model(load(), name, {"vocab": "65"} if name in ("lm", "localgpt") else {})
    claimed = [p for p in (protocols.Model, protocols.EquilibriumModel, protocols.ResidualModel, protocols.LocalModel,
                           protocols.CachesParameterTerms, protocols.SyntheticData, protocols.HasMetrics,
                           protocols.DeclaresNonconservative, protocols.NamedState)
               if all(hasattr(model, member) for member in protocol_members(p))]
    assert protocols.Model in claimed and len(claimed) >= 2, claimed
    for protocol in claimed:
        hidden = []
        for member in sorted(protocol_members(protocol)):
            try:
                inspect.getattr_static(model, member)
            except AttributeError:
                hidden.append(member)
        assert not hidden, f"{name} holds {protocol.__name__}'s {hidden} where Python 3.12's check cannot see it"
