"""Real-ESRGAN from ncnn files, tiling without seams, and the pipeline interface."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_ext.sr import NcnnError, RealESRGANPipeline, SRVGGNetCompact, from_ncnn, load_upscaler, tiled_upscale
from hf_ext.sr.onestep.tiling import tile_starts
from numerics import ROUND_TRIP_RTOL64, assert_close_rel, assert_round_trip, gamma


def write_tiny_srvgg(tmp_path, tag=0x01306B47, extra=b""):
    """A 2-feature, 1-body-conv, x2 SRVGGNetCompact in ncnn format; returns paths and the weights."""
    g = np.random.default_rng(0)
    shapes = [(2, 3), (2, 2), (12, 2)]                                        # (out, in) of the 3x3 convs
    ws = [g.standard_normal((o, i, 3, 3)).astype(np.float16).astype(np.float32) for o, i in shapes]
    bs = [g.standard_normal(o).astype(np.float32) for o, _ in shapes]
    slopes = [g.uniform(0, 0.3, 2).astype(np.float32) for _ in range(2)]
    lines = ["Input in 0 1 data", "Split sp 1 2 data d0 d1"]
    blob, body = b"", "d0"
    for k, (w, b) in enumerate(zip(ws, bs)):
        lines.append(f"Convolution c{k} 1 1 {body} c{k} 0={w.shape[0]} 1=3 4=1 5=1 6={w.size}")
        fmt = w.astype(np.float16).tobytes() if tag == 0x01306B47 else w.tobytes()
        blob += struct.pack("<I", tag) + fmt + b.tobytes()
        body = f"c{k}"
        if k < 2:
            lines.append(f"PReLU p{k} 1 1 {body} p{k} 0=2")
            blob += slopes[k].tobytes()
            body = f"p{k}"
    lines += [f"PixelShuffle ps 1 1 {body} ps 0=2", "Interp up 1 1 d1 up 0=1 1=2.0 2=2.0",
              "BinaryOp add 2 1 ps up out 0=0"]
    (tmp_path / "m.param").write_text(f"7767517\n{len(lines)} 12\n" + "\n".join(lines) + "\n")
    (tmp_path / "m.bin").write_bytes(blob + extra)
    return tmp_path / "m.param", tmp_path / "m.bin", ws, bs, slopes


@pytest.mark.parametrize("tag", [0x01306B47, 0])                               # fp16 and fp32 storage
@torch.no_grad()
def test_ncnn_srvgg_converts_to_the_same_function(tmp_path, tag):
    param, bin_path, ws, bs, slopes = write_tiny_srvgg(tmp_path, tag)
    model = from_ncnn(param, bin_path)
    assert isinstance(model, SRVGGNetCompact) and model.config.scale == 2 and model.config.num_conv == 1
    x = torch.rand(1, 3, 5, 6, dtype=torch.float64)
    h = x
    for k in range(3):                                                       # the graph, by hand
        h = F.conv2d(h, torch.from_numpy(ws[k]).double(), torch.from_numpy(bs[k]).double(), padding=1)
        if k < 2:
            h = F.prelu(h, torch.from_numpy(slopes[k]).double())
    want = F.pixel_shuffle(h, 2) + F.interpolate(x, scale_factor=2, mode="nearest")
    # equal in exact arithmetic (the fp16 weights widen exactly); in float64 the two paths differ only in
    # summation order: 3 convs of fan-in <= 27, each within 2 gamma(27, U64) sum|w x| (~6e-15 x 152 here) of
    # the other, against outputs of ~90: ~1e-14 of the scale. A misread weight moves it by O(1).
    assert_close_rel(model.double()(x), want, ROUND_TRIP_RTOL64)


def test_bad_ncnn_files_are_refused(tmp_path):
    param, bin_path, *_ = write_tiny_srvgg(tmp_path, extra=b"\0\0\0\0")
    with pytest.raises(NcnnError, match="does not match"):
        from_ncnn(param, bin_path)
    bin_path.write_bytes(bin_path.read_bytes()[:100])
    with pytest.raises(NcnnError, match="ends early"):
        from_ncnn(param, bin_path)
    param, bin_path, *_ = write_tiny_srvgg(tmp_path, tag=0x000D4B38)
    with pytest.raises(NcnnError, match="0x000d4b38"):
        from_ncnn(param, bin_path)
    param.write_text("not ncnn\n")
    with pytest.raises(NcnnError, match="magic"):
        from_ncnn(param, bin_path)
    with pytest.raises(NcnnError, match="realesrgan-x4plus"):
        load_upscaler("no-such-upscaler")


# The blend of k <= 4 tiles per output pixel, out = sum(w y) / sum(w) in float32: each product and each of the
# k additions to `out` and to `weight` rounds once, and the division once, so out is within gamma(2k + 2) = gamma(10)
# of the exact blend, relative to max |y|.
BLEND_RTOL = gamma(10)


@pytest.mark.parametrize("H, W, tile, overlap", [(100, 70, 32, 8), (33, 200, 40, 0), (64, 64, 64, 4)])
def test_tiles_cover_the_image_and_blend_without_seams(H, W, tile, overlap):
    for n in (H, W):
        starts = tile_starts(n, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, n) == n
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    up = lambda t: F.interpolate(2 * t + 1, scale_factor=3, mode="nearest")  # noqa: E731
    const = torch.full((1, 3, H, W), 0.3)
    out = tiled_upscale(up, const, 3, tile, overlap, progress=False)
    # every tile gives the same constant 1.6 (2 * 0.3 + 1, one float32 value), so the blend is 1.6 up to its rounding
    assert out.shape == (1, 3, 3 * H, 3 * W)
    torch.testing.assert_close(out, up(const), rtol=0, atol=BLEND_RTOL * 1.6)
    x = torch.rand(2, 3, H, W)
    # nearest upsampling is pixel-local, so every tile's output is exact and only the blend rounds (|y| <= 3)
    torch.testing.assert_close(tiled_upscale(up, x, 3, tile, overlap, progress=False), up(x), rtol=0, atol=BLEND_RTOL * 3)
    with pytest.raises(ValueError, match="overlap"):
        tiled_upscale(up, x, 3, tile=16, overlap=8)


@torch.no_grad()
def test_blending_damps_the_edge_errors_of_a_convolutional_upscaler():
    """What the ramps guarantee when tiles are not exact: a network of receptive radius r (LR px) is wrong only
    within r of a tile edge that lies inside the image (zero padding there, not image). With overlap o >= 2r
    and tiles in one row, such a pixel is d < s r output px from the edge of tile A, whose ramp weight there is
    (d + 1/2) / (s o) < r / o, while the neighbour B is exact there and weighs >= 1 - w_A. So the blend is off
    by at most (r / o) E, E the largest error of a single tile's output; a hard seam would keep E."""
    torch.manual_seed(0)
    net = SRVGGNetCompact(num_feat=4, num_conv=0, scale=3).eval()     # two 3x3 convs: r = 2
    r, s, tile, overlap = 2, 3, 24, 8
    x = torch.rand(1, 3, 20, 100)                                     # height <= tile: one row of tiles
    whole = net(x)                                                    # the image border is zero-padded alike
    err = 0.0
    for left in tile_starts(x.shape[-1], tile, overlap):
        y = net(x[..., left:left + tile])
        err = max(err, float((y - whole[..., s * left:s * (left + tile)]).abs().max()))
    assert err > 0.05                                                 # the tiles really are wrong at their edges
    tiled = tiled_upscale(net, x, s, tile, overlap, progress=False)
    # (r / o) E from the ramps, plus the blend's rounding (relative to the outputs' magnitude)
    bound = r / overlap * err + BLEND_RTOL * float(whole.abs().max())
    assert float((tiled - whole).abs().max()) <= bound


def test_pipeline_round_trip_outscale_and_pil(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    pipe = RealESRGANPipeline(SRVGGNetCompact(num_feat=8, num_conv=2, scale=4).eval())
    pipe.set_progress_bar_config(disable=True)
    x = torch.rand(1, 3, 20, 24)
    y = pipe(x, output_type="pt", tile=12, tile_overlap=2).images
    assert y.shape == (1, 3, 80, 96) and 0 <= float(y.min()) and float(y.max()) <= 1
    pipe.save_pretrained(tmp_path)
    again = RealESRGANPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert_round_trip(again, pipe, lambda p: p(x.double(), output_type="pt", tile=12, tile_overlap=2).images)
    img = Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype("uint8"))
    assert pipe(img, outscale=2).images[0].size == (48, 40)
    with pytest.raises(ValueError, match="outscale"):
        pipe(img, outscale=-1)


# PSNR (RGB, 4 px border left out) of each model on the astronaut's face (128 px, clean bicubic x4 LR), measured
# in float32 and float64 on two kernel sets (default and ATEN_CPU_CAPABILITY=default, 1 thread): all within
# 1.5e-6 dB of these values. Bicubic upsampling scores 25.55 dB here: Real-ESRGAN is trained for realistic
# degradations and over-sharpens a clean LR (README's table shows the same on the eval photos), so "beats
# bicubic" is no criterion, and realistic_degrade's JPEG step depends on the libjpeg build; the measured value
# is the criterion. Corrupted loads, measured when this bound was set: one conv's fp16 bytes misread -> ~5 dB;
# one conv's output channels shuffled -> -17 to +0.08 dB; two same-shaped convs swapped or the RRDB order
# reversed -> -0.36 to -17 dB; one middle conv's kernels transposed -> -0.006 to -0.06 dB; a middle conv's
# bias dropped -> -0.016 to +0.05 dB. Some corruptions raise the PSNR, hence a two-sided band.
REAL_ESRGAN_PSNR = {"realesr-animevideov3": 24.27891, "realesrgan-x4plus-anime": 21.16047, "realesrgan-x4plus": 21.88331}
# The band: the PSNR moves by (10 / ln 10) dMSE / MSE, and an output error of at most delta (clamping cannot
# enlarge it) moves the MSE by at most 2 delta rms(sr - hr) + delta^2 (Cauchy-Schwarz), so 0.005 dB holds for
# any rounding error delta <= 3.5e-5 even if aligned with the residual (rms 0.06-0.09 here): 5x the largest
# float32 error measured against float64 (6.9e-6, both kernel sets); the PSNR itself moved by 1.5e-6 dB.
PSNR_BAND_DB = 0.005


@pytest.mark.real
@pytest.mark.parametrize("name, cls, params", [("realesr-animevideov3", "SRVGGNetCompact", 621_424),
                                               ("realesrgan-x4plus-anime", "RRDBNet", 4_467_779),
                                               ("realesrgan-x4plus", "RRDBNet", 16_697_987)])
def test_real_esrgan_weights_load_and_upscale_a_real_photo(name, cls, params):
    from skimage import data

    model = load_upscaler(name)
    assert type(model).__name__ == cls and sum(p.numel() for p in model.parameters()) == params
    hr = torch.from_numpy(data.astronaut()[40:168, 170:298].astype(np.float32) / 255).permute(2, 0, 1)[None]
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        sr = model(lr).clamp(0, 1)
    mse = float(((sr.double() - hr.double())[..., 4:-4, 4:-4] ** 2).mean())
    psnr = 10 * np.log10(1 / mse)
    assert abs(psnr - REAL_ESRGAN_PSNR[name]) <= PSNR_BAND_DB, f"{name}: {psnr:.5f} dB, measured {REAL_ESRGAN_PSNR[name]}"


@pytest.mark.real                                                   # scikit-image's photos
def test_photo_split_and_eval_degradation():
    from hf_ext.sr.data import PHOTOS, bicubic_degrade, load_rgb, sr_photos, y_channel

    train, ev = sr_photos("train"), sr_photos("eval")
    assert ev and train and not {p.stem for p in train} & {p.stem for p in ev}
    assert {p.stem for p in train + ev} <= set(PHOTOS)
    hr = load_rgb(ev[0], crop=100)
    assert hr.shape[1] == 3 and hr.shape[2] <= 100 and hr.shape[2] % 4 == hr.shape[3] % 4 == 0
    lr = bicubic_degrade(hr, 4)
    # bit for bit: lr = k / 255 (k an integer < 256, correctly rounded), so lr * 255 is within an ulp of k, rounds
    # back to k, and the division gives the same float: IEEE arithmetic, the same on every machine
    assert lr.shape[-2:] == (hr.shape[2] // 4, hr.shape[3] // 4) and torch.equal(lr, (lr * 255).round() / 255)
    # (65.481 + 128.553 + 24.966 + 16) / 255 = 235 / 255 exactly; float32 rounds the weights, products, sums and
    # the offset (<= 7 roundings, as does the float32 target once): within gamma(8) of 0.92
    torch.testing.assert_close(y_channel(torch.ones(1, 3, 1, 1)), torch.full((1, 1, 1, 1), 235 / 255), rtol=gamma(8), atol=0)
    with pytest.raises(ValueError, match="split"):
        sr_photos("test")


def test_realistic_degradation_is_reproducible_and_keeps_flat_images_flat():
    from hf_ext.sr.data import realistic_degrade

    hr = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    a = realistic_degrade(hr, 4, torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 16, 12) and 0 <= float(a.min()) and float(a.max()) <= 1
    # bit for bit: the same computation (same seed, values, shapes, kernels and JPEG codec) in one process
    assert torch.equal(a, realistic_degrade(hr, 4, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, realistic_degrade(hr, 4, torch.Generator().manual_seed(2)))
    flat = realistic_degrade(torch.full((1, 3, 64, 64), 0.4), 2, torch.Generator().manual_seed(3), noise=False)
    # blur and resize (weights summing to 1) keep 0.4 within ~1e-6 of 102/255, an 8-bit level, so roundings to 8
    # bits keep it; JPEG keeps only a flat block's DC coefficient, quantised by a step <= 13 at this seed's
    # qualities (78 and 60; 16 * (200 - 2q) / 100), which moves the level by <= 13/16 < 1, i.e. <= 1 level per pass
    assert float((flat - 0.4).abs().max()) <= 2 / 255
