"""TSD-SR's released layout on tiny random SD3 configs: LoRA files in its exact key format load through peft, and
the pipeline equals a hand-written reference of its inference math; the real SD3-medium shapes on the meta device."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

from numerics import ROUND_TRIP_RTOL64, assert_close_rel

from hf_ext.sr.onestep.ops import wavelet_split_naive
from hf_ext.sr.onestep.tiling import tsdsr_tile_starts, tsdsr_tile_weights, tsdsr_tiled
from hf_ext.sr.onestep.tsdsr import (TRANSFORMER_TARGETS, VAE_TARGETS, TSDSRError, TSDSRPipeline, load_tsdsr_lora,
                                     onestep_from_sd3)
from hf_ext.sr.tinysr.surgery import keep_blocks, precache

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

BLOCKS = ("DownEncoderBlock2D",) * 4


def tiny_sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                 pooled_projection_dim=6, out_channels=4, pos_embed_max_size=16).eval()


def tiny_vae():
    torch.manual_seed(1)       # four encoder blocks, as SD3's, so every one of TSD-SR's VAE targets exists but quant_conv
    return AutoencoderKL(down_block_types=BLOCKS, up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 8, 8, 8),
                         layers_per_block=2, latent_channels=4, norm_num_groups=2, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609).eval()


def write_release(tmp_path):
    """A TSD-SR-style release from tiny models: base/ (SD3 diffusers layout), lora/ (written as train.py writes
    it: get_peft_model_state_dict + save_lora_weights), embeds/ (torch.save with a batch dim)."""
    from peft import LoraConfig, get_peft_model_state_dict

    tr, vae = tiny_sd3(), tiny_vae()
    tr.save_pretrained(tmp_path / "base/transformer")
    vae.save_pretrained(tmp_path / "base/vae")
    g = torch.Generator().manual_seed(2)
    for model, targets, name in ((tr, TRANSFORMER_TARGETS, "transformer"), (vae, VAE_TARGETS, "vae")):
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))   # B too (peft starts it at 0)
        StableDiffusion3Pipeline.save_lora_weights(tmp_path / "lora", weight_name=f"{name}.safetensors",
                                                   transformer_lora_layers=get_peft_model_state_dict(model))
    (tmp_path / "embeds").mkdir()
    torch.save(torch.randn(1, 5, 12, generator=g), tmp_path / "embeds/prompt_embeds.pt")
    torch.save(torch.randn(1, 6, generator=g), tmp_path / "embeds/pool_embeds.pt")
    return tmp_path


def with_lora_by_hand(model, path):
    """``model`` plus every LoRA of the file as forward hooks adding B(A(x)): independent of peft."""
    from safetensors.torch import load_file

    sd = load_file(path)
    for key in [k for k in sd if k.endswith("lora_A.weight")]:
        mod = model.get_submodule(key[len("transformer."):-len(".lora_A.weight")])
        A, B = sd[key], sd[key.replace("lora_A", "lora_B")]
        if isinstance(mod, torch.nn.Conv2d):
            delta = lambda x, m=mod, A=A, B=B: F.conv2d(F.conv2d(x, A, None, m.stride, m.padding, m.dilation), B)  # noqa: E731
        else:
            delta = lambda x, A=A, B=B: x @ A.T @ B.T                                                           # noqa: E731
        mod.register_forward_hook(lambda m, args, out, delta=delta: out + delta(args[0]))
    return model


@torch.no_grad()
def test_the_release_loads_through_peft_and_equals_the_math_by_hand(tmp_path):
    root = write_release(tmp_path)
    pipe = TSDSRPipeline.from_tsdsr(root / "base", root / "lora", root / "embeds")
    lr = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    got = pipe(lr, upscale=4, process_size=32, output_type="pt", generator=torch.Generator().manual_seed(4)).images

    # the reference: test_tsdsr.py's steps on the base models with the LoRAs added by hand
    tr = with_lora_by_hand(SD3Transformer2DModel.from_pretrained(root / "base/transformer"), root / "lora/transformer.safetensors")
    vae = with_lora_by_hand(AutoencoderKL.from_pretrained(root / "base/vae"), root / "lora/vae.safetensors")
    prompt, pooled = torch.load(root / "embeds/prompt_embeds.pt"), torch.load(root / "embeds/pool_embeds.pt")
    x = (F.interpolate(lr, size=(32, 48), mode="bicubic", align_corners=False) * 2 - 1).clamp(-1, 1)
    z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(4)) * 1.5305              # no shift
    v = tr(hidden_states=z, timestep=torch.tensor([1000.0]), encoder_hidden_states=prompt, pooled_projections=pooled).sample
    sr = vae.decode((z - v) / 1.5305).sample.clamp(-1, 1) / 2 + 0.5
    ref = F.interpolate(lr, size=(32, 48), mode="bicubic", align_corners=False)
    want = (wavelet_split_naive(sr)[0] + wavelet_split_naive(ref)[1]).clamp(0, 1)
    # float32 with the LoRA summed in another order (peft adds B(A x) * 1.0 after the base layer, as here),
    # through ~40 layers: a few ulps of the activations' scale (~1), so 1e-5 is the issue's bar with margin
    assert got.shape == (1, 3, 32, 48) and (got - want).abs().max() < 1e-5
    assert sum(".lora_A" in n for n, _ in pipe.transformer.named_parameters()) == 11 + 10 + 3   # block 0, the last block (no ff_context), pos_embed + norm_out + proj_out


def test_tiling_follows_tsdsr_and_blends_to_the_untiled_result():
    assert tsdsr_tile_starts(20, 8, 2) == [0, 6, 12] and tsdsr_tile_starts(64, 64, 8) == [0]
    assert tsdsr_tile_starts(120, 64, 8) == [0, 56] and tsdsr_tile_starts(100, 64, 8) == [0, 36]
    w = tsdsr_tile_weights(8)
    assert w[4].argmax() in (3, 4) and w[:, 3].argmax() == 4 and torch.equal(w[:, 3], w[:, 4])   # centres 3.5, 4
    z = torch.randn(1, 4, 20, 14)
    pointwise = lambda t: 2 * t + t.square()                                                         # noqa: E731
    # a pointwise map is the same on every tile, so the weighted mean returns it up to float32 rounding
    assert torch.allclose(tsdsr_tiled(pointwise, z, tile=8, overlap=2), pointwise(z), atol=1e-5, rtol=1e-5)
    assert torch.equal(tsdsr_tiled(pointwise, z[..., :8, :8], tile=8), pointwise(z[..., :8, :8]))  # area <= tile²


def test_bad_files_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    root = write_release(tmp_path)
    sd = load_file(root / "lora/transformer.safetensors")
    save_file({"base_model.model." + k[len("transformer."):]: v for k, v in sd.items()}, root / "peft.safetensors")
    with pytest.raises(TSDSRError, match="key format.*transformer.transformer_blocks.0.attn.to_q.lora_A.weight"):
        load_tsdsr_lora(tiny_sd3(), root / "peft.safetensors", TRANSFORMER_TARGETS)
    save_file({k: v for k, v in sd.items() if "blocks.1." not in k}, root / "short.safetensors")
    with pytest.raises(TSDSRError, match="LoRA weights missing"):
        load_tsdsr_lora(tiny_sd3(), root / "short.safetensors", TRANSFORMER_TARGETS)
    (root / "embeds/pool_embeds.pt").unlink()
    with pytest.raises(TSDSRError, match=r"lacks \['pool_embeds.pt'\]"):
        TSDSRPipeline.from_tsdsr(root / "base", root / "lora", root / "embeds")
    with pytest.raises(TSDSRError, match="transformer/ and vae/"):
        TSDSRPipeline.from_tsdsr(root / "lora", root / "lora", root / "embeds")


def test_sd3_medium_shapes_fit_on_the_meta_device():
    """TSD-SR's targets on the real SD3-medium configs (no weights): the LoRA shapes of its released files."""
    from peft import LoraConfig

    with torch.device("meta"):
        tr = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        vae = AutoencoderKL(down_block_types=BLOCKS, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            use_quant_conv=False, use_post_quant_conv=False)
        tr.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=TRANSFORMER_TARGETS))
        vae.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=VAE_TARGETS))
    shapes = {n: tuple(p.shape) for n, p in tr.named_parameters() if ".lora_" in n}
    assert len(shapes) == 2 * (23 * 11 + 10 + 3)       # 24 blocks (the last without ff_context), pos_embed, norm_out, proj_out
    assert shapes["transformer_blocks.0.attn.to_q.lora_A.default.weight"] == (64, 1536)
    assert shapes["pos_embed.proj.lora_A.default.weight"] == (64, 16, 2, 2)
    vae_shapes = {n: tuple(p.shape) for n, p in vae.named_parameters() if ".lora_" in n}
    assert len(vae_shapes) == 2 * 31 and not any(n.startswith("decoder") for n in vae_shapes)   # quant_conv: none
    assert vae_shapes["encoder.conv_in.lora_B.default.weight"] == (128, 64, 1, 1)


@torch.no_grad()
def test_tinysr_tools_run_on_the_converted_sd3_transformer(tmp_path):
    root = write_release(tmp_path)
    pipe = TSDSRPipeline.from_tsdsr(root / "base", root / "lora", root / "embeds")
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(5))
    want = pipe.velocity(z)
    one = onestep_from_sd3(pipe.transformer, pipe.prompt_embeds, pipe.pooled_prompt_embeds)
    # the same sums with each LoRA merged into its weight (W + B A rounded once, vs W x + B (A x)): float32
    # reassociation through 2 blocks, a few ulps of outputs of size ~1
    assert (one(z) - want).abs().max() < 1e-5
    assert torch.equal(precache(one)(z), one(z))                            # pre-caching: bit-identical
    assert torch.equal(keep_blocks(one, [0, 1])(z), one(z))                 # all-ones masks: nothing changes
    assert keep_blocks(one, [1]).config.num_layers == 1                      # depth pruning made real
    with pytest.raises(TSDSRError, match="no qk_norm or dual attention"):
        onestep_from_sd3(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                               caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
                                               qk_norm="rms_norm"), pipe.prompt_embeds, pipe.pooled_prompt_embeds)


@torch.no_grad()
def test_a_saved_onestep_pipeline_of_the_release_keeps_tsdsr_math(tmp_path):
    from hf_ext.sr import OneStepSRPipeline

    root = write_release(tmp_path)
    pipe = TSDSRPipeline.from_tsdsr(root / "base", root / "lora", root / "embeds")
    pipe.to_onestep().save_pretrained(tmp_path / "onestep")
    again = OneStepSRPipeline.from_pretrained(tmp_path / "onestep")
    again.set_progress_bar_config(disable=True)
    assert again.config.latent_math == "tsdsr"
    lr = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    kw = dict(upscale=4, output_type="pt")
    want = pipe(lr, process_size=32, generator=torch.Generator().manual_seed(4), **kw).images
    got = again(lr, generator=torch.Generator().manual_seed(4), **kw).images
    # merged LoRAs (W + B A rounded once) and the colour fix done in [-1, 1] instead of [0, 1]: float32 rounding
    # of values ~1 through ~40 layers, as in the tests above
    assert (got - want).abs().max() < 1e-5


def test_cli_convert_tsdsr_writes_a_folder_that_loads(tmp_path, capsys):
    import json

    from conversion.cli import main
    from hf_ext.sr import OneStepSRPipeline

    root = write_release(tmp_path)
    args = ["convert", "tsdsr", "--base", str(root / "base"), "--lora", str(root / "lora"), "--embeds", str(root / "embeds")]
    assert main([*args, "--precache", "--out", str(tmp_path / "out"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["precached"] and r["max_abs_diff_vs_tsdsr"] < 1e-5           # as in the tests above
    pipe = OneStepSRPipeline.from_pretrained(tmp_path / "out")
    assert pipe.config.latent_math == "tsdsr" and pipe.transformer.config.precached
    assert "stable-diffusion-3-medium" in (tmp_path / "out/README.md").read_text()
    (root / "embeds/prompt_embeds.pt").unlink()
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "prompt_embeds.pt" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@torch.no_grad()
def test_prune_student_keeps_tsdsr_math(tmp_path):
    from hf_ext.sr import prune_student

    root = write_release(tmp_path)
    one = TSDSRPipeline.from_tsdsr(root / "base", root / "lora", root / "embeds").to_onestep()
    student = prune_student(one, [1], vae_width=2, text_stream=False)   # one block, no prompt, pruned SepConv VAE
    assert student.config.latent_math == "tsdsr" and student.transformer.config.num_layers == 1
    assert not student.transformer.config.text_stream
    student.set_progress_bar_config(disable=True)
    assert student(torch.rand(1, 3, 8, 8), upscale=4, output_type="pt").images.shape == (1, 3, 32, 32)


@pytest.mark.real                                                   # distils on scikit-image's photos
def test_tinysr_compresses_the_tsdsr_layout_end_to_end(tmp_path):
    import dataclasses

    from helpers import run_without_hf_ext
    from hf_ext.sr import OneStepSRPipeline, TinySRConfig, compress_tinysr
    from hf_ext.sr.tinysr.surgery import drop_text_stream

    root = write_release(tmp_path)
    teacher = TSDSRPipeline.from_tsdsr(root / "base", root / "lora", root / "embeds").to_onestep()
    config = TinySRConfig(keep_blocks=1, vae_width=2, group_size=2, search_steps=2, distill_steps=2, batch_size=2,
                          crop=32, drop_text_stream=True)
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(5))
    # lr = 0: only the gates train, so the student's transformer is the teacher's, its kept block only, its prompt
    # dropped and pre-cached; bit for bit (each step is exact on the same values: tests above)
    frozen, log0 = compress_tinysr(teacher, dataclasses.replace(config, lr=0.0), progress=False)
    want = precache(drop_text_stream(keep_blocks(teacher.transformer, log0["keep"])))
    with torch.no_grad():
        assert torch.equal(frozen.transformer(z), want(z))

    student, log = compress_tinysr(teacher, config, progress=False)
    assert student.config.latent_math == "tsdsr"
    t = student.transformer.config
    assert (t.num_layers, t.text_stream, t.precached) == (1, False, True) and len(log["keep"]) == 1
    student.save_pretrained(tmp_path / "student")
    again = OneStepSRPipeline.from_pretrained(tmp_path / "student").to(torch.float64)
    again.set_progress_bar_config(disable=True)
    lr = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    torch.save(lr, tmp_path / "lr.pt")
    want = again(lr, upscale=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    got = run_without_hf_ext(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'student')!r}, trust_remote_code=True).to(torch.float64)
        y = pipe(torch.load({str(tmp_path / 'lr.pt')!r}), upscale=4, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
        print(json.dumps({{"math": pipe.config.latent_math, "y": y.flatten().tolist()}}))
    """)
    assert got["math"] == "tsdsr"
    # float64 on both sides and the same seeded posterior sample: the same computation up to memory alignment
    # (the round-trip bound, tests/numerics.py)
    assert_close_rel(torch.tensor(got["y"], dtype=torch.float64).view_as(want), want, ROUND_TRIP_RTOL64)
