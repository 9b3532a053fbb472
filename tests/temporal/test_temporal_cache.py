"""Temporal feature cache: the same samples (to rounding) on tiny DiT, PixArt and UNets; keys; save/load; bad input."""
from __future__ import annotations

import pytest
import torch
from diffusers import (DDIMScheduler, DiTTransformer2DModel, EulerDiscreteScheduler, PixArtTransformer2DModel,
                       UNet2DConditionModel, UNet2DModel)

from hf_ext.macs import count_macs
from hf_ext.temporal import TemporalError, TemporalFeatureCache, apply_temporal_cache, find_tib, remove_temporal_cache
from numerics import assert_close_rel

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

B = 16   # denoiser batch rows: on this machine's MKL the table matches the uncached model bit for bit from 16 rows

# Samples with table lookups vs computed temporal features. The table is computed in one batch of S x L rows,
# the model computes the same features on its own batch, and BLAS may sum the dot products of another batch
# size in another order: each temporal feature then differs by at most 2 gamma(256) of its terms (fan-in <= 256,
# the sinusoidal time projection), about 1 ulp in practice. The 6 DDIM steps carry that to the samples, which
# the scheduler clips to [-1, 1]. Measured: 0 from 16 rows with AVX2 MKL; 6e-8 (DiT) with MKL_CBWR=COMPATIBLE,
# whose kernels sum in another order; 3.7e-6 / 5.4e-6 with 2 rows (AVX2 / COMPATIBLE). 1e-4 of the sample scale
# holds with 18x room everywhere, and a lookup keyed by the wrong step moves the samples by 1.5 to 2.
TEMPORAL_RTOL = 1e-4


def _g(seed=1):
    return torch.Generator().manual_seed(seed)


def dit():
    torch.manual_seed(0)
    labels = torch.tensor([1, 3, 10, 10]).repeat(B // 4)                            # 10: the CFG null label
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2), \
        lambda x, t: dict(hidden_states=x, timestep=t.expand(B), class_labels=labels), (B, 4, 8, 8)


def pixart():
    torch.manual_seed(0)
    txt = torch.randn(B, 5, 16, generator=_g())
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=16, caption_channels=16, sample_size=8,
                                    patch_size=2, norm_num_groups=1, use_additional_conditions=False), \
        lambda x, t: dict(hidden_states=x, encoder_hidden_states=txt, timestep=t.expand(B),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}), (B, 4, 8, 8)


def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8), lambda x, t: dict(sample=x, timestep=t), (B, 3, 8, 8)


def unet_cond():
    torch.manual_seed(0)
    txt = torch.randn(B, 5, 16, generator=_g())
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), \
        lambda x, t: dict(sample=x, timestep=t, encoder_hidden_states=txt), (B, 4, 8, 8)


FAMILIES = {"dit": dit, "pixart": pixart, "unet": unet, "unet_cond": unet_cond}


@torch.no_grad()
def sample(model, inputs, shape, scheduler, steps=6):
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=_g(2))
    for t in scheduler.timesteps:
        out = model(**inputs(x, t)).sample
        x = scheduler.step(out[:, :shape[1]], t, x).prev_sample
    return x


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_temporal_features_give_the_same_samples(family):
    model, inputs, shape = FAMILIES[family]()
    model.eval()
    sched = DDIMScheduler(num_train_timesteps=1000)
    ref = sample(model, inputs, shape, sched)
    cache = apply_temporal_cache(model, sched, num_inference_steps=6)
    # keys: exactly the sampler's steps (both from the same set_timesteps arithmetic on the same config)
    assert torch.equal(cache.timesteps, sched.timesteps)
    with count_macs() as cached:
        got = sample(model, inputs, shape, sched)
    remove_temporal_cache(model)
    with count_macs() as full:
        again = sample(model, inputs, shape, sched)
    assert_close_rel(got, ref, TEMPORAL_RTOL)                                   # see TEMPORAL_RTOL
    # removed: the model's own forward on the same values and shapes again, so bit for bit on every machine
    assert torch.equal(again, ref)
    assert cached.by_op["linear"] < full.by_op["linear"]        # the TIB MLPs left the hot path (integer MACs)


def test_tib_modules_are_found_per_family():
    assert find_tib(dit()[0]).modules[:2] == ["transformer_blocks.0.norm1.emb", "transformer_blocks.0.norm1.linear"]
    assert find_tib(pixart()[0]).modules == ["adaln_single"]
    tib = find_tib(unet()[0])
    assert tib.modules[:2] == ["time_proj", "time_embedding"] and len(tib.time_emb_projs) == 2 + 4 + 2   # down, up, mid resnets
    with pytest.raises(TemporalError, match="no recognisable time-embedding path: looked for DiT"):
        find_tib(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_table_is_keyed_by_schedule_and_round_trips(tmp_path):
    model, inputs, shape = dit()
    model.eval()
    sched = DDIMScheduler(num_train_timesteps=1000)
    cache = TemporalFeatureCache.build(model, sched, 6)
    assert cache.tables["proj_out_1"].shape == (6 * 11, 2 * 16)                   # 6 steps x 11 labels, (shift, scale)
    cache.save(tmp_path)
    loaded = TemporalFeatureCache.load(tmp_path)
    # saving and loading is data movement: bit for bit
    assert loaded.key == cache.key and all(torch.equal(loaded.tables[k], v) for k, v in cache.tables.items())
    with pytest.raises(TemporalError, match="with 6 steps, not DDIMScheduler with 8"):
        loaded.check(sched, 8)
    with pytest.raises(TemporalError, match="not EulerDiscreteScheduler"):
        apply_temporal_cache(model, EulerDiscreteScheduler(num_train_timesteps=1000), 6, cache=loaded)
    ref = sample(model, inputs, shape, sched)
    apply_temporal_cache(model, sched, 6, cache=cache)
    want = sample(model, inputs, shape, sched)                                   # the table before saving
    remove_temporal_cache(model)
    assert_close_rel(want, ref, TEMPORAL_RTOL)                                   # see TEMPORAL_RTOL
    apply_temporal_cache(model, sched, 6, cache=loaded)
    # bit for bit on every machine: the loaded table holds the saved bits, and a lookup copies its rows into
    # fresh (aligned) tensors, which meet the same kernels as the rows of the table before saving. (Against
    # the uncached model it holds only within TEMPORAL_RTOL: with MKL_CBWR=COMPATIBLE the table's batch of
    # 66 rows and the model's 16 round the temporal features differently.)
    assert torch.equal(sample(model, inputs, shape, sched), want)
    with pytest.raises(TemporalError, match="time step .* is not in the temporal cache"):
        sample(model, inputs, shape, sched, steps=8)                              # a step the table does not hold
    with pytest.raises(TemporalError, match="already applied"):
        apply_temporal_cache(model, sched, 6)
    remove_temporal_cache(model)
    other, _, _ = pixart()
    with pytest.raises(TemporalError, match="built for another model"):
        apply_temporal_cache(other, cache=loaded)
    with pytest.raises(TemporalError, match="has no temporal_cache.safetensors"):
        TemporalFeatureCache.load(tmp_path / "nothing")


@torch.no_grad()
def test_composes_with_icc_on_the_same_transformer():
    from hf_ext.dit_cache import ICCConfig, apply_icc_cache, remove_icc_cache

    model, inputs, shape = dit()
    model.eval()
    sched = DDIMScheduler(num_train_timesteps=1000)
    cfg = ICCConfig(rank=4, method="svd", full_every=2)
    apply_icc_cache(model, cfg)
    icc_only = sample(model, inputs, shape, sched)
    remove_icc_cache(model)
    apply_temporal_cache(model, sched, 6)
    apply_icc_cache(model, cfg)
    both = sample(model, inputs, shape, sched)
    remove_icc_cache(model)
    remove_temporal_cache(model)
    # ICC's cached steps pass the temporal features' rounding difference on without amplifying it: TEMPORAL_RTOL
    assert_close_rel(both, icc_only, TEMPORAL_RTOL)


@torch.no_grad()
def test_small_batches_differ_only_by_float_rounding():
    # below 16 rows the uncached model's own BLAS kernel rounds the temporal features differently (1 ulp)
    model, _, _ = dit()
    model.eval()
    labels = torch.tensor([1, 10])
    inputs = lambda x, t: dict(hidden_states=x, timestep=t.expand(2), class_labels=labels)  # noqa: E731
    sched = DDIMScheduler(num_train_timesteps=1000)
    ref = sample(model, inputs, (2, 4, 8, 8), sched)
    apply_temporal_cache(model, sched, 6)
    got = sample(model, inputs, (2, 4, 8, 8), sched)
    assert_close_rel(got, ref, TEMPORAL_RTOL)                 # measured 3.7e-6 (AVX2), 5.4e-6 (MKL_CBWR=COMPATIBLE)
