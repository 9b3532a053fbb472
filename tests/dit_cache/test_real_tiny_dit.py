"""ICC on the trained tiny DiT (tests/fixtures/tiny_dit, from benchmarks/train_tiny_dit.py): real weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_ext.dit_cache import ICCConfig, apply_icc_cache, calibrate, icc_state, remove_icc_cache
from hf_ext.dit_cache.calibration import ddim_trajectory

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_dit"
pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(FIXTURE, torch_dtype=torch.float32).eval()


def _psnr(a, b):
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))   # latents in about [-1, 1]: peak-to-peak 2


@torch.no_grad()
def test_every_step_full_is_bit_identical(dit):
    ref = ddim_trajectory(dit, samples=4, steps=6, seed=3)
    apply_icc_cache(dit, ICCConfig(rank=4, method="svd", full_every=1))
    try:
        got = ddim_trajectory(dit, samples=4, steps=6, seed=3)
    finally:
        remove_icc_cache(dit)
    assert torch.equal(got, ref)


@torch.no_grad()
def test_ca_svd_correction_beats_reuse_on_the_trained_model(dit):
    ref = ddim_trajectory(dit, samples=8, steps=20, seed=5)
    psnr = {}
    for method in ("reuse", "svd", "ca-svd"):
        cfg = ICCConfig(rank=8, method=method, full_every=2)
        # calibrated on another run (seed 0) than the one measured (seed 5)
        factors = calibrate(dit, cfg, run=lambda: ddim_trajectory(dit, samples=4, steps=10, seed=0))
        apply_icc_cache(dit, cfg, factors)
        try:
            got = ddim_trajectory(dit, samples=8, steps=20, seed=5)
            assert icc_state(dit).full_steps == 10
        finally:
            remove_icc_cache(dit)
        psnr[method] = _psnr(got, ref)
    assert psnr["ca-svd"] > psnr["reuse"] and psnr["svd"] > psnr["reuse"], psnr
