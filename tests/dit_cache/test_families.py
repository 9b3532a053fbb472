"""ICC on tiny random DiT, PixArt, SD3 and Flux transformers; CFG branches through cache_context; saving factors."""
from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

from hf_ext.dit_cache import (ICCConfig, ICCError, apply_icc_cache, compute_factors, enable_cache, icc_state,
                              load_factors, remove_icc_cache, save_factors)
from numerics import assert_close_rel

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`


def _g():
    return torch.Generator().manual_seed(1)


def dit():
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8,
                                 patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2), \
        lambda x, t: dict(hidden_states=x, timestep=t, class_labels=torch.tensor([1, 3])), (2, 4, 8, 8)


def pixart():
    txt = torch.randn(2, 5, 16, generator=_g())
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=16, caption_channels=16, sample_size=8,
                                    patch_size=2, norm_num_groups=1, use_additional_conditions=False), \
        lambda x, t: dict(hidden_states=x, encoder_hidden_states=txt, timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}), (2, 4, 8, 8)


def sd3():
    txt, pooled = torch.randn(2, 5, 16, generator=_g()), torch.randn(2, 8, generator=_g())
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16), \
        lambda x, t: dict(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t), (2, 4, 8, 8)


def flux():
    txt, pooled = torch.randn(2, 5, 16, generator=_g()), torch.randn(2, 8, generator=_g())
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).view(16, 3)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4)), \
        lambda x, t: dict(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t / 1000,
                          img_ids=img_ids, txt_ids=torch.zeros(5, 3)), (2, 16, 4)


FAMILIES = {"dit": dit, "pixart": pixart, "sd3": sd3, "flux": flux}


def _run(model, inputs, shape, n=4):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    outs = []
    for k in range(n):
        x = x + 0.05 * torch.randn(shape, generator=g)
        outs.append(model(**inputs(x, torch.tensor([900.0 - 100 * k] * 2))).sample)
    return outs


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_every_family_full_is_identical_and_full_rank_is_exact(family):
    torch.manual_seed(0)
    model, inputs, shape = FAMILIES[family]()
    model.eval()
    ref = _run(model, inputs, shape)
    apply_icc_cache(model, ICCConfig(rank=1, method="reuse", full_every=1), {})
    # bit for bit on every machine: a full step runs each layer's own forward on the same values and shapes,
    # into fresh (aligned) tensors, so the same kernels compute the same bits as without the hooks
    assert all(torch.equal(a, b) for a, b in zip(_run(model, inputs, shape), ref))
    remove_icc_cache(model)
    cfg = ICCConfig(rank=16, method="svd", full_every=4)
    apply_icc_cache(model, cfg, compute_factors(model, cfg, allow_full_rank=True))
    # full-rank cached steps equal the uncached outputs in exact arithmetic: each cached linear adds about
    # gamma(fan-in <= 80 + 16) ~ 6e-6 of its terms' size (plus the SVD's reconstruction error, of the same
    # order), ~20 dependent ops, outputs O(1) (max 1.9): within 1e-4 of the output scale everywhere (measured
    # 2.0e-7 to 2.7e-7 over the four families); naive reuse is off by 1.3e-2 to 4e-2, every correction with the
    # wrong sign by 7.8e-4 to 2.7e-3
    for a, b in zip(_run(model, inputs, shape), ref):
        assert_close_rel(a, b, 1e-4)
    assert icc_state(model).full_steps == 1 and icc_state(model).step == 4


@torch.no_grad()
def test_cfg_branches_keep_their_own_cache_on_a_cache_mixin_model():
    torch.manual_seed(0)
    model, inputs, shape = flux()
    model.eval()
    apply_icc_cache(model, ICCConfig(rank=4, method="svd", full_every=2))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500.0, 500.0])
    with model.cache_context("cond"):
        model(**inputs(x, t))
    with model.cache_context("uncond"):
        model(**inputs(x * 2, t))          # a different branch must not reuse cond's cache
    assert icc_state(model, "cond").full_steps == 1 and icc_state(model, "uncond").full_steps == 1
    with model.cache_context("cond"):
        cached = model(**inputs(x, t)).sample   # cached step with zero increment: exactly the full output
    assert icc_state(model, "cond").step == 2 and icc_state(model, "cond").full_steps == 1
    remove_icc_cache(model)
    # bit for bit on every machine: cond's cached call sees exactly the inputs of its full call, so in every
    # layer B x - ẑ subtracts the result of the same matmul on the same values and shapes (exactly 0), and
    # addmm(ŷ, 0, Aᵀ) returns ŷ unchanged (ŷ + 0); ŷ is the layer's own forward, as in the uncached call.
    # (One cache shared by both branches is caught by the per-context step counts above.)
    assert torch.equal(cached, model(**inputs(x, t)).sample)


def test_factors_round_trip_and_refuse_another_model(tmp_path):
    torch.manual_seed(0)
    model, _, _ = dit()
    cfg = ICCConfig(rank=4, method="svd", full_every=3)
    factors = compute_factors(model, cfg)
    save_factors(tmp_path, factors, cfg)
    back, cfg2 = load_factors(tmp_path)
    assert cfg2 == cfg and back.keys() == factors.keys()
    # saving and loading is data movement: bit for bit
    assert all(torch.equal(back[k][0], factors[k][0]) and torch.equal(back[k][1], factors[k][1]) for k in factors)
    other, _, _ = sd3()
    with pytest.raises(ICCError, match="another model: recalibrate|do not fit"):
        apply_icc_cache(other, cfg, back)


def test_enable_cache_refuses_to_stack():
    from diffusers import FirstBlockCacheConfig

    torch.manual_seed(0)
    model, _, _ = flux()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ICCError, match="already has a diffusers cache enabled"):
        enable_cache(model, ICCConfig(rank=4, method="svd"))
    model.disable_cache()
    enable_cache(model, ICCConfig(rank=4, method="svd"))
    with pytest.raises(ICCError, match="already applied"):
        enable_cache(model, ICCConfig(rank=4, method="svd"))
