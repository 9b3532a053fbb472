"""The committed one-step SR teacher (benchmarks/train_sr_teacher.py) and its TinySR student (hf-ext convert
tinysr): real weights load with hf-ext and as remote code without it, pre-caching is bit-identical on them, and
the student really is the compressed model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_ext.sr.data import bicubic_degrade, load_rgb, sr_photos
from hf_ext.sr.onestep.modeling_sepconv_vae import SepConvAutoencoderKL
from hf_ext.sr.onestep.pipeline_onestep_sr import OneStepSRPipeline
from hf_ext.sr.tinysr.surgery import precache

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
pytestmark = [pytest.mark.real, pytest.mark.numerics]


def load(name):
    pipe = OneStepSRPipeline.from_pretrained(FIXTURES / name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_precaching_the_real_teacher_is_bit_identical_on_a_held_out_photo():
    teacher = load("sr_teacher")
    lr = bicubic_degrade(load_rgb(sr_photos("eval")[2], 64), 4)
    ref = teacher(lr, upscale=4, output_type="pt").images
    cached = OneStepSRPipeline(vae=teacher.vae, transformer=precache(teacher.transformer))
    cached.set_progress_bar_config(disable=True)
    # the same weights (shared VAE) and the same kernels: pre-caching only computes the modulations earlier
    assert torch.equal(cached(lr, upscale=4, output_type="pt").images, ref)


def test_the_student_is_the_compressed_teacher():
    teacher, student = load("sr_teacher"), load("sr_tinysr")
    count = lambda p: sum(x.numel() for m in (p.vae, p.transformer) for x in m.parameters())   # noqa: E731
    assert count(student) < 0.2 * count(teacher)
    assert student.transformer.config.precached and not hasattr(student.transformer, "time_text_embed")
    assert student.transformer.config.num_layers < teacher.transformer.config.num_layers
    assert type(student.vae) is SepConvAutoencoderKL and not student.vae.config.mid_block_add_attention
    assert student.vae.config.block_out_channels[0] < teacher.vae.config.block_out_channels[0]
    assert list(student.transformer.config.trained_upscales) == list(teacher.transformer.config.trained_upscales) == [2, 4]


@torch.no_grad()
def test_the_real_student_loads_without_hf_ext(tmp_path):
    from helpers import run_without_hf_ext

    student = load("sr_tinysr")
    lr = bicubic_degrade(load_rgb(sr_photos("eval")[0], 64), 2)
    torch.save(lr, tmp_path / "lr.pt")
    ref = student(lr, upscale=2, output_type="pt").images
    got = run_without_hf_ext(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(FIXTURES / 'sr_tinysr')!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        y = pipe(torch.load({str(tmp_path / 'lr.pt')!r}), upscale=2, output_type="pt").images
        print(json.dumps({{"y": y.flatten().tolist()}}))
    """)
    # bit for bit: both processes map the same files, so every weight sits at the same offset within its
    # page, hence the same alignment and the same SIMD kernels (see tests/numerics.py)
    assert torch.equal(torch.tensor(got["y"]).view_as(ref), ref)
