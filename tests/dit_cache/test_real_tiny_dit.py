"""ICC on the trained tiny DiT (tests/fixtures/tiny_dit, from benchmarks/train_tiny_dit.py): real weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_ext.dit_cache import ICCConfig, apply_icc_cache, calibrate, icc_state, remove_icc_cache
from hf_ext.dit_cache.calibration import ddim_trajectory

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_dit"
pytestmark = [pytest.mark.real, pytest.mark.numerics]


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
    # bit for bit on every machine: every call is full, so each layer runs its own forward on the same values
    # and shapes (the extra ẑ = B x̂ is computed beside it and never enters the output)
    assert torch.equal(got, ref)


@torch.no_grad()
def test_ca_svd_correction_beats_reuse_on_the_trained_model(dit):
    ref = ddim_trajectory(dit, samples=8, steps=20, seed=5)
    psnr = {}
    for method in ("reuse", "ca-svd"):
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
    # measured here: CA-SVD 35.5 dB vs reuse 31.0 dB (+4.5). Spread (8 samples each): calibration seeds 0-2 give
    # +4.5 to +5.5 on this measurement seed; measurement seeds 5-7 x calibration seeds 0-2 give +1.9 to +5.5.
    # The benchmark (64 samples, 35 steps, 45% saved) gives +2.5 dB, an independent check +3.1 dB. A correction
    # switched off or zeroed factors give +0. (Plain SVD is not asserted: it ranged -1.4 to +4.5 dB over the
    # measurement seeds in this setting, so "SVD beats reuse" is not a robust claim at rank 8 here.) What this
    # cannot see: a sign flip of every correction (the cached linears come in chained pairs, v -> out and
    # ff.0 -> ff.2, so the first-order effect is the square of the sign) and factors of the next block (+1.7 dB:
    # trained blocks share dominant directions); the full-rank tests and test_icc's ratio test catch those.
    assert psnr["ca-svd"] > psnr["reuse"] + 1.5, psnr
