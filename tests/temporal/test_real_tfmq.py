"""TFMQ on the trained tiny DiT (tests/fixtures/tiny_dit): the cache-based method beats naive PTQ at W4A8."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from hf_ext.dit_cache.calibration import ddim_trajectory
from hf_ext.temporal.quant import TFMQConfig, quantize_tfmq, remove_tfmq

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_dit"
pytestmark = pytest.mark.real


@torch.no_grad()
def test_cache_based_tfmq_beats_naive_ptq_at_w4a8():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(FIXTURE, torch_dtype=torch.float32).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    traj = lambda seed, n: ddim_trajectory(model, n, 20, seed=seed, scheduler=sched).clamp(-1, 1)  # noqa: E731
    ref = traj(5, 16)
    psnr = {}
    for name, cfg in {"naive": TFMQConfig(weight_bits=4, calibration="minmax", temporal="quantize"),
                      "tfmq": TFMQConfig(weight_bits=4)}.items():
        quantize_tfmq(model, cfg, sched, 20, run=lambda: traj(0, 8))           # calibrated on another seed
        got = traj(5, 16)
        remove_tfmq(model)
        psnr[name] = float(10 * torch.log10(4 / ((got - ref) ** 2).mean()))
    # measured here: TFMQ 21.7 dB vs naive 16.3 dB (+5.5). Spread: calibration seeds 0-1 move the gap by 0.1 dB;
    # measurement seeds 5-7 give +5.5 to +9.9. The benchmark (64 samples, 35 steps) gives +4.3 dB. 3 dB stays
    # below all of them; quantizing the temporal layers instead of caching them (finite-set PTQ) gives about +0
    assert psnr["tfmq"] > psnr["naive"] + 3.0, psnr
