"""TinySR compression: VAE channel pruning, the SepConv VAE class, remote-code loading, input errors, and the
whole search -> prune -> distil -> pre-cache path on a tiny teacher (and through the CLI)."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL
from numerics import (ROUND_TRIP_RTOL64, U32, assert_close_rel, assert_round_trip, assert_same_weights, float64_copy,
                      gamma)

from hf_ext.sr.onestep.modeling_onestep_sr import OneStepSRTransformer2DModel
from hf_ext.sr.onestep.modeling_sepconv_vae import SepConvAutoencoderKL
from hf_ext.sr.onestep.pipeline_onestep_sr import OneStepSRPipeline
from hf_ext.sr.tinysr.compress import prune_student
from hf_ext.sr.tinysr.vae_compression import remove_attention, to_sepconv_vae
from hf_ext.sr.tinysr.vae_channel_pruning import channel_spaces, prune_vae_channels
from test_sr_onestep import tiny_transformer


def tiny_vae(width=16, groups=8):
    torch.manual_seed(2)
    return AutoencoderKL(block_out_channels=(width, 2 * width), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=groups,
                         layers_per_block=1).eval()


def tiny_teacher(scales=(2, 4)):
    transformer = tiny_transformer(layers=4)
    transformer.register_to_config(trained_upscales=scales)
    pipe = OneStepSRPipeline(vae=tiny_vae(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def kill_every_other_group(vae) -> None:
    """Zero every second group (or attention channel) of every channel space the pruning sees, in place."""
    spaces = channel_spaces(vae)
    params = dict(vae.named_parameters())
    for name, uses in spaces.uses.items():
        for dim, s in uses:
            if dim == 0:
                n, g = spaces.sizes[s], spaces.groups[s]
                unit = torch.arange(n) // (n // g) if g else torch.arange(n)
                params[name].data.index_fill_(0, torch.nonzero(unit % 2 == 1).flatten(), 0.0)


def sd3_like_vae():
    """SD3's VAE layout at a tiny width: four blocks of two ResNets, 16 latent channels, no quant convs, a shift."""
    torch.manual_seed(3)
    return AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16,
                         norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                         shift_factor=0.0609).eval()


@pytest.mark.parametrize("make, latent_side", [(tiny_vae, {"quant_conv.weight", "quant_conv.bias",
                                                             "post_quant_conv.weight", "post_quant_conv.bias"}),
                                               (sd3_like_vae, set())])
def test_channel_pruning_is_exact_when_the_dropped_channels_carry_nothing(make, latent_side):
    vae = make()
    covered = set(channel_spaces(vae).uses)
    assert {n for n, _ in vae.named_parameters()} - covered == {      # only latent- and image-side tensors
        "encoder.conv_out.bias", "decoder.conv_out.bias", *latent_side}
    with torch.no_grad():
        kill_every_other_group(vae)
    vae = float64_copy(vae)            # float64, so that rescaling q by sqrt(16 / 32) below rounds at U64, not U32
    width = vae.config.block_out_channels[0] // 2
    small = prune_vae_channels(vae, width)
    assert small.config.block_out_channels == tuple(c // 2 for c in vae.config.block_out_channels)
    assert small.config.norm_num_groups == vae.config.norm_num_groups // 2
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    # equal in exact arithmetic (a dead group's GroupNorm gives 0 * ... + 0 = 0, zero inputs add 0, and the mid
    # attention's q is rescaled to keep q.k / sqrt(d)); the two widths differ in summation order and that one
    # rescaling, which move float64 outputs by ~n U64 of their scale (the round-trip bound, tests/numerics.py);
    # leaving q unscaled (a defect of the pruning) already fails it
    with torch.no_grad():
        assert_close_rel(small(x).sample, vae(x).sample, ROUND_TRIP_RTOL64)
    assert sum(p.numel() for p in small.parameters()) < 0.3 * sum(p.numel() for p in vae.parameters())


@torch.no_grad()
def test_the_compressed_vae_keeps_sd3s_16_channel_latent_space(tmp_path):
    vae = sd3_like_vae()
    small = to_sepconv_vae(remove_attention(prune_vae_channels(vae, 4)))
    cfg = small.config
    assert (cfg.block_out_channels, cfg.latent_channels, cfg.use_quant_conv) == ((4, 8, 8, 8), 16, False)
    assert (cfg.scaling_factor, cfg.shift_factor) == (1.5305, 0.0609)                 # the teacher's latent space
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    assert small.encode(x).latent_dist.mode().shape == vae.encode(x).latent_dist.mode().shape == (1, 16, 4, 6)
    assert small(x).sample.shape == x.shape
    assert sum(p.numel() for p in small.parameters()) < 0.15 * sum(p.numel() for p in vae.parameters())
    small.save_pretrained(tmp_path)
    assert_round_trip(SepConvAutoencoderKL.from_pretrained(tmp_path), small, lambda m: m(x.double()).sample)


def test_channel_pruning_refuses_bad_widths_and_models():
    with pytest.raises(ValueError, match="whole numbers"):
        prune_vae_channels(tiny_vae(), 5)                              # 8 groups * 5/16 is not whole
    with pytest.raises(ValueError, match="width=32"):
        prune_vae_channels(tiny_vae(), 32)
    with pytest.raises(TypeError, match="before converting to SepConv"):
        prune_vae_channels(to_sepconv_vae(tiny_vae()), 8)


@torch.no_grad()
def test_sepconv_vae_keeps_shapes_and_round_trips(tmp_path):
    dense = remove_attention(tiny_vae())
    sep = to_sepconv_vae(dense)
    assert isinstance(sep, SepConvAutoencoderKL) and sep.config.sepconv_min_kernel == 3
    assert sum(p.numel() for p in sep.parameters()) < 0.4 * sum(p.numel() for p in dense.parameters())
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    assert sep.encode(x).latent_dist.mode().shape == dense.encode(x).latent_dist.mode().shape == (1, 4, 12, 20)
    assert sep(x).sample.shape == x.shape
    sep.save_pretrained(tmp_path)
    assert_round_trip(SepConvAutoencoderKL.from_pretrained(tmp_path), sep, lambda m: m(x.double()).sample)


@torch.no_grad()
def test_pipeline_round_trips_and_loads_without_hf_ext(tmp_path):
    from helpers import run_without_hf_ext

    pipe = OneStepSRPipeline(vae=to_sepconv_vae(tiny_vae()), transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    run = lambda p: p(x, upscale=2, output_type="pt").images  # noqa: E731
    pipe.save_pretrained(tmp_path)
    again = OneStepSRPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert type(again.vae) is SepConvAutoencoderKL
    assert_round_trip(again, pipe, run)
    torch.save(x, tmp_path / "x.pt")
    got = run_without_hf_ext(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).to(torch.float64)
        y = pipe(torch.load({str(tmp_path / 'x.pt')!r}), upscale=2, output_type="pt").images
        print(json.dumps({{"cls": type(pipe).__name__, "vae": type(pipe.vae).__name__, "y": y.flatten().tolist()}}))
    """)
    assert got["cls"] == "OneStepSRPipeline" and got["vae"] == "SepConvAutoencoderKL"
    # float64 on both sides, so loading at other memory alignments cannot matter (see tests/numerics.py)
    want = run(float64_copy(pipe))
    assert_close_rel(torch.tensor(got["y"], dtype=torch.float64).view_as(want), want, ROUND_TRIP_RTOL64)


def test_pipeline_refuses_bad_input(tmp_path):
    pipe = tiny_teacher(scales=(4,))
    with pytest.raises(ValueError, match=r"trained for x4 only"):
        pipe(torch.rand(1, 3, 8, 8), upscale=2)
    coarse = OneStepSRPipeline(vae=tiny_vae(), transformer=OneStepSRTransformer2DModel(
        patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8))   # 2 x 4 = 8 px per patch
    with pytest.raises(ValueError, match="smaller than one latent patch"):
        coarse(torch.rand(1, 3, 1, 8), upscale=4)                   # 4 px high at x4 < 8
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        pipe(str(tmp_path / "empty.png"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        pipe(tmp_path / "notes.png")


@pytest.mark.real                                                   # trains on scikit-image's photos
def test_compress_tinysr_end_to_end_on_a_tiny_teacher(tmp_path):
    from hf_ext.sr.tinysr.compress import TinySRConfig, compress_tinysr, continue_distillation

    teacher = tiny_teacher()
    before = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    with pytest.raises(ValueError, match="keep_blocks=3"):
        compress_tinysr(teacher, TinySRConfig(keep_blocks=3, vae_width=8, group_size=2))
    with pytest.raises(ValueError, match="degrade='blur'"):
        compress_tinysr(teacher, TinySRConfig(keep_blocks=2, vae_width=8, group_size=2, degrade="blur"))
    config = TinySRConfig(keep_blocks=2, vae_width=8, group_size=2, search_steps=3, distill_steps=2, batch_size=2, crop=32)
    x = torch.rand(1, 3, 8, 8)

    # With lr=0 nothing trains but the gates, so the student must be exactly the teacher with the searched
    # blocks kept (as a 0/1 block mask on the teacher, without keep_blocks or pre-caching) and the pruned VAE.
    frozen, log0 = compress_tinysr(teacher, dataclasses.replace(config, lr=0.0), progress=False)
    masked = copy.deepcopy(teacher.transformer)
    masked.block_mask.copy_(torch.tensor([float(i in log0["keep"]) for i in range(4)]))
    want = OneStepSRPipeline(vae=prune_student(teacher, log0["keep"], vae_width=8).vae, transformer=masked)
    want.set_progress_bar_config(disable=True)
    assert_same_weights(frozen.vae, want.vae)                                  # data movement and the same SVDs
    frozen.set_progress_bar_config(disable=True)
    # bit for bit: exact 0/1 masks select blocks exactly (x * 1 + 0 * y), pre-caching computes the same
    # modulations on the same row, and the VAEs are identical: the same computation on the same values
    assert torch.equal(frozen(x, upscale=4, output_type="pt").images, want(x, upscale=4, output_type="pt").images)

    student, log = compress_tinysr(teacher, config, progress=False)
    assert len(log["keep"]) == 2 and student.transformer.config.num_layers == 2
    assert student.transformer.config.precached and type(student.vae) is SepConvAutoencoderKL
    assert student.transformer.config.trained_upscales == (2, 4)
    assert all(torch.equal(v, teacher.transformer.state_dict()[k]) for k, v in before.items())   # teacher untouched
    n = lambda p: sum(x.numel() for m in (p.vae, p.transformer) for x in m.parameters())        # noqa: E731
    assert n(student) < 0.5 * n(teacher)
    student.set_progress_bar_config(disable=True)
    assert student(x, upscale=4, output_type="pt").images.shape == (1, 3, 32, 32)
    state = {k: v.clone() for k, v in student.transformer.state_dict().items()}
    more, log = continue_distillation(student, teacher, config, progress=False)     # more steps, same structure
    assert log["continued"] and more.transformer.config.num_layers == 2
    after = more.transformer.state_dict()
    cached = [k for k in state if k.endswith(".value")]
    assert cached and all(torch.equal(after[k], state[k]) for k in cached)          # the modulations stay ...
    assert any(not torch.equal(after[k], v) for k, v in state.items() if k not in cached)   # ... the rest trains
    with pytest.raises(ValueError, match="not pre-cached"):
        continue_distillation(teacher, teacher, config)


@pytest.mark.real                                                   # trains and evaluates on scikit-image's photos
def test_convert_tinysr_cli(tmp_path, capsys):
    from conversion.cli import main

    tiny_teacher().save_pretrained(tmp_path / "teacher")
    args = ["convert", "tinysr", "--teacher", str(tmp_path / "teacher"), "--keep-blocks", "2", "--vae-width", "8",
            "--group-size", "2", "--search-steps", "2", "--distill-steps", "2", "--batch-size", "2", "--crop", "32", "--json"]
    assert main(args + ["--out", str(tmp_path / "student")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["student_params"] < result["teacher_params"] and result["student_gmacs_256px"] < result["teacher_gmacs_256px"]
    assert (tmp_path / "student" / "README.md").read_text().count("hf-ext convert tinysr") == 1
    assert OneStepSRPipeline.from_pretrained(tmp_path / "student").transformer.config.precached
    assert main(args + ["--continue-from", str(tmp_path / "student"), "--out", str(tmp_path / "more")]) == 0
    more = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert more["keep"] == result["keep"] and more["student_params"] == result["student_params"]
    assert "--continue-from" in (tmp_path / "more" / "README.md").read_text()
    assert main(args[:-1] + ["--vae-width", "5", "--out", str(tmp_path / "bad")]) == 2   # refused, nothing left
    assert "vae_width" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.real                                                   # scikit-image's photos
def test_mixed_training_batches_draw_both_degradations():
    import torch.nn.functional as F

    from hf_ext.sr.data import bicubic_degrade, sr_batches

    # A batch is bicubic if its LR is the clean degradation of its HR. Recomputing it from the batch's HR (mapped
    # to [-1, 1] and back, off by <= 1 float32 ulp) can flip an 8-bit rounding that sits that close to a half:
    # one LR level (1/255) on any of the 16 taps of the x2 bicubic upsampling, whose |weights| sum to
    # 1.28^2 = 1.64: <= 1.64 / 255 in [0, 1], twice that in [-1, 1]. Realistic LR is off by 0.6 or more.
    def is_bicubic(up, hr, s):
        clean = F.interpolate(bicubic_degrade((hr + 1) / 2, s), scale_factor=s, mode="bicubic", align_corners=False)
        return float((up - (clean.clamp(0, 1) * 2 - 1)).abs().max()) <= 2 * 1.64 / 255 + 1e-6

    kinds = {is_bicubic(up, hr, s) for up, hr, s in (next(b) for b in [sr_batches("train", 32, 2, (2,), degrade="mixed")]
                                                     for _ in range(8))}
    assert kinds == {True, False}
    up, hr, s = next(sr_batches("train", 32, 2, (2,), degrade="bicubic"))
    assert is_bicubic(up, hr, s)
    with pytest.raises(ValueError, match="degrade='blur'"):
        next(sr_batches("train", 32, 2, (2,), degrade="blur"))


def test_distillation_can_hold_the_students_whole_path_to_the_teacher():
    from hf_ext.sr.tinysr.distillation import distill

    teacher = tiny_teacher()
    student = prune_student(teacher, [0, 2], vae_width=8)
    up = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = []
    for w in (0.0, 1.0):
        s = copy.deepcopy(student)
        losses.append(distill(s, teacher, iter([(up, None, 2)]), steps=1, output_weight=w, progress=False)["final_loss"])
    # The whole-path term is the L1 distance between the student's image and the teacher's, both as at inference
    # (encode, one step, decode), so it is what turning it on adds to the first step's loss (taken before the
    # update, on the same batch: the other terms are the same computation in both runs).
    with torch.no_grad():
        term = (student.decode(student.step(student.encode(up))) - teacher.decode(teacher.step(teacher.encode(up))))
        term = float(term.double().abs().mean())
    # Each loss is a float32 mean of 6144 (image) or 2 x 4 x 16 x 16 = 2048 (latent) terms, within gamma(6144) of
    # its exact value in any summation order, so the difference of the two runs' totals is within
    # gamma(6144) (losses[0] + losses[1]) of the term, and the term computed here in float64 within gamma(6144) term.
    assert term > 0.05                                         # the student is not the teacher yet
    tol = gamma(6144) * (losses[0] + losses[1] + term) + 4 * U32 * losses[1]
    assert abs((losses[1] - losses[0]) - term) <= tol, (losses, term)


def test_the_training_loops_run_through_a_given_accelerator():
    from accelerate import Accelerator

    from hf_ext.sr.onestep.training import train_onestep, train_vae
    from hf_ext.sr.tinysr.depth_search import DepthSearchConfig, search_depth
    from hf_ext.sr.tinysr.distillation import distill

    class Counting(Accelerator):
        def prepare(self, *args, **kwargs):
            self.prepared.append(len(args))
            return super().prepare(*args, **kwargs)

    acc = Counting(cpu=True)
    acc.prepared = []
    teacher = tiny_teacher()
    student = prune_student(teacher, [0, 2], vae_width=8)
    up = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = teacher.encode(up).detach()
    distill(student, teacher, iter([(up, None, 2)]), steps=1, progress=False, accelerator=acc)
    train_onestep(copy.deepcopy(teacher.transformer).requires_grad_(True), teacher.vae, iter([(up, up, 2)]), steps=1,
                  progress=False, accelerator=acc)
    train_vae(copy.deepcopy(student.vae).requires_grad_(True), iter([up]), steps=1, progress=False, accelerator=acc)
    search_depth(copy.deepcopy(teacher.transformer).requires_grad_(True), [(z, z)],
                 DepthSearchConfig(group_size=2, keep=1, steps=1), progress=False, accelerator=acc)
    # fit prepares (model, optimizer, scheduler); the depth search (student, gates, optimizer): all four through acc
    assert acc.prepared == [3, 3, 3, 3]
