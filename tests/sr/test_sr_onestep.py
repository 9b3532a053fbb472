"""One-step SR: pre-caching is bit-identical, depth masks equal real pruning, colour fixes, the pipeline."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from numerics import OPS_FP64_ATOL, U32, assert_round_trip, float64_copy, gamma

from hf_ext.sr.onestep.modeling_onestep_sr import OneStepSRTransformer2DModel
from hf_ext.sr.onestep.ops import adain_color_fix, wavelet_color_fix, wavelet_split, wavelet_split_naive
from hf_ext.sr.onestep.pipeline_onestep_sr import OneStepSRPipeline
from hf_ext.sr.tinysr.surgery import drop_text_stream, keep_blocks, precache

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`


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
    # bit for bit: pre-caching computes the same modulations with the same linears on the same single row, and
    # the rest is the same computation on the same values and shapes (tests/numerics.py, kind 1)
    assert torch.equal(cached(x), model(x))
    assert not hasattr(cached, "time_text_embed") and not hasattr(cached, "context_embedder")
    assert sum(p.numel() for p in cached.parameters()) < sum(p.numel() for p in model.parameters())
    cached.save_pretrained(tmp_path)
    assert_round_trip(OneStepSRTransformer2DModel.from_pretrained(tmp_path).eval(), cached, lambda m: m(x.double()))
    pipe, img = tiny_pipeline(), torch.rand(1, 3, 9, 7)
    fast = tiny_pipeline(precache(pipe.transformer))
    assert torch.equal(pipe(img, output_type="pt").images, fast(img, output_type="pt").images)   # as above


@torch.no_grad()
def test_depth_masks_equal_a_model_with_fewer_blocks(tmp_path):
    model = tiny_transformer(4)
    x = torch.randn(1, 4, 8, 8)
    # bit for bit throughout: a mask of exact 0s and 1s gives m * new + (1 - m) * old = new or old exactly, and
    # the kept blocks run the same computation on the same values and shapes
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


@torch.no_grad()
def test_dropping_the_text_stream_equals_a_prompt_of_no_tokens(tmp_path):
    model = tiny_transformer(4)
    x = torch.randn(2, 4, 6, 10)
    text_free = drop_text_stream(model)
    names = "".join(text_free.state_dict())
    assert not any(n in names for n in ("prompt_embeds", "context_embedder", "add_q_proj", "to_add_out", "ff_context",
                                        "norm1_context"))
    assert sum(p.numel() for p in text_free.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    # the same model fed a prompt of no tokens: SD3's joint attention over the image tokens and none more
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}   # (_use_default_values would win)
    no_prompt = OneStepSRTransformer2DModel.from_config({**config, "prompt_length": 0}).eval()
    no_prompt.load_state_dict({k: v for k, v in model.state_dict().items() if k != "prompt_embeds"}, strict=False)
    # bit for bit: concatenating no tokens and splitting them off again leaves the same values and shapes, so
    # both run the same computation (tests/numerics.py, kind 1)
    assert torch.equal(text_free(x), no_prompt(x))
    assert not torch.allclose(text_free(x), model(x), atol=1e-3)          # it is lossy: the prompt is gone
    assert torch.equal(precache(text_free)(x), text_free(x))              # pre-caching: bit-identical, as above
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.equal(keep_blocks(text_free, [0, 2, 3])(x), text_free(x, block_mask=mask))
    cached = precache(keep_blocks(text_free, [0, 2, 3]))
    cached.save_pretrained(tmp_path)
    assert_round_trip(OneStepSRTransformer2DModel.from_pretrained(tmp_path).eval(), cached, lambda m: m(x.double()))
    with pytest.raises(ValueError, match="before pre-caching"):
        drop_text_stream(precache(model))


def test_colour_fixes_restore_the_reference_colours():
    # float64, O(1) values: the ops chain 5 levels of 9-tap sums, each within gamma(9, U64) = 1e-15 of exact, so
    # OPS_FP64_ATOL (1e-12) has room; a broken fix is off by the 0.3 cast or more
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 40, 33, generator=g, dtype=torch.float64)
    for got, want in zip(wavelet_split(ref, 4), wavelet_split_naive(ref, 4)):
        torch.testing.assert_close(got, want, rtol=0, atol=OPS_FP64_ATOL)
    # the blur is linear and keeps constants (its taps sum to 1, replicate padding): low(ref + c) = low(ref) + c
    torch.testing.assert_close(wavelet_color_fix(ref + 0.3, ref), ref, rtol=0, atol=OPS_FP64_ATOL)     # colour cast
    detail = torch.rand(2, 3, 40, 33, generator=g, dtype=torch.float64)
    torch.testing.assert_close(wavelet_color_fix(detail, detail), detail, rtol=0, atol=OPS_FP64_ATOL)  # high + low = x
    scale = torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64)[:, None, None]
    shift = torch.tensor([0.1, -0.4, 0.2], dtype=torch.float64)[:, None, None]
    # AdaIN is exact up to its eps: with c = a ref + b (a > 0) it returns m + (ref - m) a s / (a s + eps), m and s
    # the reference's per-channel mean and std, so it is off by |ref - m| eps / (a s + eps) (3.5e-5 here)
    eps, m, sd = 1e-5, ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    bound = float(((ref - m).abs() * eps / (scale * sd + eps)).max())
    torch.testing.assert_close(adain_color_fix(ref * scale + shift, ref, eps), ref, rtol=0, atol=bound + OPS_FP64_ATOL)
    with pytest.raises(ValueError, match="equal sizes"):
        wavelet_color_fix(ref, ref[..., :-1])


def ramps(n: int, ramp: int, up: bool, down: bool) -> torch.Tensor:
    """The blend weight along one side of a tile, as tiling.py documents it: a linear ramp (i + 1/2) / ramp over
    ``ramp`` pixels on each side that meets another tile, 1 elsewhere (float64)."""
    c = torch.arange(n, dtype=torch.float64) + 0.5
    w = torch.ones(n, dtype=torch.float64)
    if up:
        w = torch.minimum(w, c / ramp)
    if down:
        w = torch.minimum(w, (n - c) / ramp)
    return w


@torch.no_grad()
def test_pipeline_shapes_tiles_colour_fixes_and_round_trip(tmp_path):
    from PIL import Image

    from hf_ext.sr.onestep.ops import adain_color_fix as adain, wavelet_color_fix as wavelet

    pipe = tiny_pipeline()
    img = torch.rand(1, 3, 13, 10)                           # 4x gives 52 x 40: padded to the latent grid inside
    lr = pipe.image_processor.preprocess(img)                # [-1, 1]
    sr = pipe.upscale_tile(lr, 4)                             # one tile covers it (tile=64)
    up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    for fix, fn in (("wavelet", wavelet), ("adain", adain), (None, lambda a, b: a)):
        out = pipe(img, upscale=4, output_type="pt", tile=64, color_fix=fix).images
        want = pipe.image_processor.postprocess((fn(sr, up)).clamp(-1, 1), output_type="pt")
        assert out.shape == (1, 3, 52, 40) and 0 <= float(out.min()) and float(out.max()) <= 1
        # bit for bit: the pipeline runs these same ops on the same values and shapes (the colours come from
        # the bicubic upsampled LR, after the one step)
        assert torch.equal(out, want), fix
    # Tiles of 8 LR px overlapping by 2 (rows start at 0 and 5, columns at 0 and 2). The transformer's attention
    # is global, so each tile's output differs from the whole image's everywhere and no bound ties the tiled
    # output to the untiled one; what tiling.py promises is the blend: every output pixel is the average of
    # the tiles' outputs there, weighted by linear ramps over s * overlap = 8 px on the sides that meet a tile.
    tiled = pipe(img, upscale=4, output_type="pt", tile=8, tile_overlap=2, color_fix=None).images
    num = den = 0
    scale = 1.0
    for top, bottom, th in ((0, False, 8), (5, True, 8)):
        for left, right, tw in ((0, False, 8), (2, True, 8)):
            y = pipe.upscale_tile(lr[..., top:top + th, left:left + tw], 4).double()
            w = ramps(4 * th, 8, top > 0, not bottom)[:, None] * ramps(4 * tw, 8, left > 0, not right)[None]
            num = num + torch.nn.functional.pad(y * w, (4 * left, 40 - 4 * (left + tw), 4 * top, 52 - 4 * (top + th)))
            den = den + torch.nn.functional.pad(w, (4 * left, 40 - 4 * (left + tw), 4 * top, 52 - 4 * (top + th)))
            scale = max(scale, float(y.abs().max()))
    want = (num / den).clamp(-1, 1) / 2 + 0.5
    # the float32 blend of <= 4 tiles is within gamma(10) of exact, relative to |y| (see the realesrgan tiling
    # tests), and halving and adding 0.5 round twice more; the tile outputs themselves are the same computation
    assert tiled.shape == want.shape and float((tiled.double() - want).abs().max()) <= gamma(10) * scale + 2 * U32
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
    from hf_ext.sr.tinysr.vae_compression import remove_attention

    vae = tiny_pipeline().vae
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    lean = remove_attention(vae)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(lean) < n(vae) and not torch.equal(lean(x).sample, vae(x).sample)
    for mid in (vae.encoder.mid_block, vae.decoder.mid_block):
        for attn in mid.attentions:
            attn.to_out[0].weight.zero_()
            attn.to_out[0].bias.zero_()                       # the residual attention now adds exactly 0
    # bit for bit: x + 0 is x, and everything else is the same computation on the same values and shapes
    assert torch.equal(remove_attention(vae)(x).sample, vae(x).sample)
    lean.save_pretrained(tmp_path)
    assert_round_trip(AutoencoderKL.from_pretrained(tmp_path), lean, lambda m: m(x.double()).sample)
    vae64 = float64_copy(vae)
    for p in vae64.parameters():
        p.mul_(1 + 2 ** -30)                                  # values that float32 cannot hold
    kept = remove_attention(vae64).state_dict()
    assert all(torch.equal(v, vae64.state_dict()[k]) for k, v in kept.items())   # data movement, in float64 too
    with pytest.raises(TypeError, match="AutoencoderKL"):
        remove_attention(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_sepconv_factorization_is_exact_for_separable_weights_and_shrinks_the_vae():
    from hf_ext.sr.tinysr.ops import sepconv_factors, sepconv_weight_naive
    from hf_ext.sr.tinysr.vae_compression import replace_with_sepconv, sepconv_from_conv

    g = torch.Generator().manual_seed(0)
    dw, pw = torch.randn(6, 1, 3, 3, generator=g), torch.randn(5, 6, 1, 1, generator=g)
    dense = sepconv_weight_naive(dw, pw)                                   # separable by construction
    # the SVD runs in float64 (error ~1e-15); casting the two factors to float32 and their product round 3
    # times, relative to each |w|: within 4 U32 max|w|
    got = sepconv_weight_naive(*sepconv_factors(dense))
    torch.testing.assert_close(got, dense, rtol=0, atol=4 * U32 * float(dense.abs().max()))
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    conv.weight.copy_(dense)
    x = torch.randn(2, 6, 9, 9, generator=g)
    # depthwise then pointwise vs one dense conv: equal in exact arithmetic; each float32 output is a sum of 54
    # products (+ bias), within gamma(55) sum |w x| of exact in any order (both sides: twice), and the factors
    # are off by 4 U32 |w| as above. Higham's bound, computed per output pixel from |w| * |x|:
    magnitude = torch.nn.functional.conv2d(x.abs(), dense.abs(), conv.bias.abs(), padding=1)
    err = (sepconv_from_conv(conv)(x) - conv(x)).abs()
    assert bool((err <= (2 * gamma(55) + 4 * U32) * magnitude).all()), float((err / magnitude).max())
    rand = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64)       # not separable: the best rank-1 fit
    err = (sepconv_weight_naive(*sepconv_factors(rand)) - rand).norm()
    tail = torch.linalg.svdvals(rand.permute(1, 0, 2, 3).reshape(6, 5, 9))[:, 1:]   # Eckart-Young: the rest
    # float64: SVDs are backward stable (singular values within ~n U64 ||A|| = 1e-14 of exact, n <= 9) and the
    # residual norm sums 270 squares: 1e-10 of ~5 is 1e4 times that; a wrong factor pair is off by O(1)
    torch.testing.assert_close(err, tail.square().sum().sqrt(), rtol=1e-10, atol=0)
    vae = tiny_pipeline().vae
    before = sum(p.numel() for p in vae.parameters())
    assert replace_with_sepconv(vae) > 0 and sum(p.numel() for p in vae.parameters()) < before
    assert vae(torch.rand(1, 3, 16, 16)).sample.shape == (1, 3, 16, 16)
