"""One-step SR: pre-caching is bit-identical, depth masks equal real pruning, colour fixes, the pipeline."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from numerics import assert_round_trip

from hf_ext.sr.modeling_onestep_sr import OneStepSRTransformer2DModel, keep_blocks, precache
from hf_ext.sr.ops import adain_color_fix, wavelet_color_fix, wavelet_split, wavelet_split_naive
from hf_ext.sr.pipeline_onestep_sr import OneStepSRPipeline


def tiny_transformer(layers=3):
    torch.manual_seed(0)
    return OneStepSRTransformer2DModel(num_layers=layers, num_attention_heads=2, attention_head_dim=8,
                                       joint_attention_dim=16, pooled_projection_dim=16, pos_embed_max_size=32).eval()


def tiny_pipeline(transformer=None):
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).eval()
    pipe = OneStepSRPipeline(vae=vae, transformer=transformer or tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_precaching_is_bit_identical_and_drops_the_embedding_modules(tmp_path):
    model = tiny_transformer()
    x = torch.randn(2, 4, 6, 10)
    cached = precache(model)
    assert torch.equal(cached(x), model(x))
    assert not hasattr(cached, "time_text_embed") and not hasattr(cached, "context_embedder")
    assert sum(p.numel() for p in cached.parameters()) < sum(p.numel() for p in model.parameters())
    cached.save_pretrained(tmp_path)
    assert_round_trip(OneStepSRTransformer2DModel.from_pretrained(tmp_path).eval(), cached, lambda m: m(x.double()))
    pipe, img = tiny_pipeline(), torch.rand(1, 3, 9, 7)
    fast = tiny_pipeline(precache(pipe.transformer))
    assert torch.equal(pipe(img, output_type="pt").images, fast(img, output_type="pt").images)


@torch.no_grad()
def test_depth_masks_equal_a_model_with_fewer_blocks(tmp_path):
    model = tiny_transformer(4)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(keep_blocks(model, [0, 1, 2, 3])(x), model(x))
    for keep in ([0, 2], [1, 3], [3]):
        mask = torch.tensor([float(i in keep) for i in range(4)])
        small = keep_blocks(model, keep)
        assert small.config.num_layers == len(keep) and torch.equal(small(x), model(x, block_mask=mask))
        assert torch.equal(precache(small)(x), small(x))          # also when the last block is gone
    small.save_pretrained(tmp_path)
    loaded = OneStepSRTransformer2DModel.from_pretrained(tmp_path).eval()
    assert_round_trip(loaded, small, lambda m: m(x.double()))
    with pytest.raises(ValueError, match="increasing block indices"):
        keep_blocks(model, [2, 1])


def test_colour_fixes_restore_the_reference_colours():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 40, 33, generator=g)
    for got, want in zip(wavelet_split(ref, 4), wavelet_split_naive(ref, 4)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(wavelet_color_fix(ref + 0.3, ref), ref, rtol=0, atol=1e-5)     # colour cast
    detail = torch.rand(2, 3, 40, 33, generator=g)
    torch.testing.assert_close(wavelet_color_fix(detail, detail), detail, rtol=0, atol=1e-6)   # high + low = x
    scale, shift = torch.tensor([0.5, 2.0, 1.3])[:, None, None], torch.tensor([0.1, -0.4, 0.2])[:, None, None]
    torch.testing.assert_close(adain_color_fix(ref * scale + shift, ref), ref, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="equal sizes"):
        wavelet_color_fix(ref, ref[..., :-1])


def test_pipeline_shapes_tiles_and_round_trip(tmp_path):
    from PIL import Image

    pipe = tiny_pipeline()
    img = torch.rand(1, 3, 13, 10)                           # 4x gives 52 x 40: padded to the latent grid inside
    out = pipe(img, upscale=4, output_type="pt", tile=64).images
    assert out.shape == (1, 3, 52, 40) and 0 <= float(out.min()) and float(out.max()) <= 1
    tiled = pipe(img, upscale=4, output_type="pt", tile=8, tile_overlap=2).images
    assert tiled.shape == out.shape
    pipe.save_pretrained(tmp_path)
    again = OneStepSRPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert_round_trip(again, pipe, lambda p: p(img.double(), upscale=4, output_type="pt").images)
    assert pipe(Image.new("RGB", (10, 6)), upscale=2, color_fix="adain").images[0].size == (20, 12)
    with pytest.raises(ValueError, match="color_fix"):
        pipe(img, color_fix="lab")
    with pytest.raises(ValueError, match="upscale"):
        pipe(img, upscale=1.5)


@torch.no_grad()
def test_vae_attention_removal_is_exact_when_the_attention_adds_nothing(tmp_path):
    from hf_ext.sr.vae import remove_attention

    vae = tiny_pipeline().vae
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    lean = remove_attention(vae)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(lean) < n(vae) and not torch.equal(lean(x).sample, vae(x).sample)
    for mid in (vae.encoder.mid_block, vae.decoder.mid_block):
        for attn in mid.attentions:
            attn.to_out[0].weight.zero_()
            attn.to_out[0].bias.zero_()                       # the residual attention now adds exactly 0
    torch.testing.assert_close(remove_attention(vae)(x).sample, vae(x).sample, rtol=0, atol=1e-6)
    lean.save_pretrained(tmp_path)
    assert_round_trip(AutoencoderKL.from_pretrained(tmp_path), lean, lambda m: m(x.double()).sample)
    with pytest.raises(TypeError, match="AutoencoderKL"):
        remove_attention(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_sepconv_factorization_is_exact_for_separable_weights_and_shrinks_the_vae():
    from hf_ext.sr.ops import sepconv_factors, sepconv_weight_naive
    from hf_ext.sr.vae import replace_with_sepconv, sepconv_from_conv

    g = torch.Generator().manual_seed(0)
    dw, pw = torch.randn(6, 1, 3, 3, generator=g), torch.randn(5, 6, 1, 1, generator=g)
    dense = sepconv_weight_naive(dw, pw)                                   # separable by construction
    torch.testing.assert_close(sepconv_weight_naive(*sepconv_factors(dense)), dense, rtol=1e-5, atol=1e-5)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    conv.weight.copy_(dense)
    x = torch.randn(2, 6, 9, 9, generator=g)
    torch.testing.assert_close(sepconv_from_conv(conv)(x), conv(x), rtol=1e-4, atol=1e-4)
    rand = torch.randn(5, 6, 3, 3, generator=g)                            # not separable: the best rank-1 fit
    err = (sepconv_weight_naive(*sepconv_factors(rand)) - rand).norm()
    tail = torch.linalg.svdvals(rand.permute(1, 0, 2, 3).reshape(6, 5, 9))[:, 1:]   # Eckart-Young: the rest
    torch.testing.assert_close(err, tail.square().sum().sqrt(), rtol=1e-4, atol=1e-5)
    vae = tiny_pipeline().vae
    before = sum(p.numel() for p in vae.parameters())
    assert replace_with_sepconv(vae) > 0 and sum(p.numel() for p in vae.parameters()) < before
    assert vae(torch.rand(1, 3, 16, 16)).sample.shape == (1, 3, 16, 16)
