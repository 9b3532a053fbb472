"""Forecast-and-correct ICC: Taylor forecasts, reduced-rank regression, module granularity, by hand and on a
tiny DiT."""
from __future__ import annotations

import pytest
import torch
from dit_tiny import dit_calls, tiny_dit
from numerics import U32, assert_close_rel, gamma

from hf_ext.dit_cache import (ICCConfig, ICCError, apply_icc_cache, calibrate, compute_factors, icc_state,
                              load_factors, remove_icc_cache, residual_stats, save_factors, select_ridge)
from hf_ext.dit_cache.calibration import RIDGES
from hf_ext.dit_cache.ops import rrr_factors, rrr_factors_naive, taylor_forecast, taylor_forecast_naive

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

W = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
A1, B1 = torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0, 0.0]])    # rank 1: keeps only W[0, 0] = 2


class FF(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.net = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity(), torch.nn.Linear(2, 2, bias=False)])
        self.net[2].weight.data = W.clone()

    def forward(self, x):
        self.calls += 1
        return self.net[2](x)


class Dummy(torch.nn.Module):
    """transformer_blocks.0.ff is a module (granularity="module"); its net.2 a linear (granularity="linear")."""

    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([torch.nn.Module()])
        self.transformer_blocks[0].ff = FF()

    def forward(self, x):
        return torch.relu(self.transformer_blocks[0].ff(x))


def test_taylor_forecast_is_the_extrapolating_polynomial():
    g = torch.Generator().manual_seed(0)
    steps = [0, 1, 3, 4, 7]                                        # uneven, as with a warmup then an interval
    hist = [(s, torch.randn(3, 5, generator=g, dtype=torch.float64)) for s in steps]
    for order in range(4):
        for at in (8, 9, 11):
            got, want = taylor_forecast(hist, at, order), taylor_forecast_naive(hist, at, order)
            # both evaluate the same degree-<=3 polynomial in float64 from steps <= 11: the Lagrange weights
            # are at most C(11, 3)-sized (~1e3) and each form rounds ~20 times, so they agree within
            # 1e3 * gamma(20, 2^-53) of max |value| (~3); a wrong node or order is off by O(1)
            assert (got - want).abs().max() <= 3e3 * gamma(20, 2.0 ** -53), (order, at)
    # a polynomial of degree <= order is reproduced; integers and dyadic quotients keep it exact in float32
    cubic = [(s, torch.tensor([float(s ** 3 - 2 * s)])) for s in (0, 2, 4, 6)]
    assert taylor_forecast(cubic, 8, 3).item() == 8 ** 3 - 16
    assert taylor_forecast(cubic, 8, 0).item() == 6 ** 3 - 12          # order 0: the last value (reuse)
    assert taylor_forecast(cubic[:1], 8, 2).item() == 0.0             # fewer points: a lower order


@torch.no_grad()
def test_linear_forecast_and_correct_by_hand():
    # every value is a small integer, and so is every intermediate: exact in float32 on any kernel
    m = Dummy()
    cfg = ICCConfig(rank=1, method="svd", full_every=2, forecast=1)
    apply_icc_cache(m, cfg, {"transformer_blocks.0.ff.net.2": (A1, B1)})
    assert m(torch.tensor([[1.0, 1.0]])).tolist() == [[2.0, 3.0]]           # step 0, full: W x
    # step 1, cached with one full step of history: the paper's ICC, ŷ + A B (x - x̂) = [2 + 2, 3]
    assert m(torch.tensor([[2.0, 2.0]])).tolist() == [[4.0, 3.0]]
    assert m(torch.tensor([[3.0, 3.0]])).tolist() == [[6.0, 9.0]]           # step 2, full
    # step 3: forecasts from steps 0 and 2, y_f = [6, 9] + ([6, 9] - [2, 3]) / 2 = [8, 12], z_f = B x_f = 4;
    # x = [5, 5]: B x - z_f = 1, so y = [8, 12] + A 1 = [10, 12] (exact W x = [10, 15]; the error (W - A B)
    # (x - x_f) = [0, 3]). The paper's ICC would give [6, 9] + A (5 - 3) = [10, 9].
    assert m(torch.tensor([[5.0, 5.0]])).tolist() == [[10.0, 12.0]]
    assert (icc_state(m).step, icc_state(m).full_steps) == (4, 2)


@torch.no_grad()
def test_module_granularity_skips_the_module_and_corrects_by_hand():
    m = Dummy()
    ff = m.transformer_blocks[0].ff
    cfg = ICCConfig(rank=1, method="rrr", granularity="module", full_every=3, warmup=1, forecast=1)
    assert cfg.targets.endswith(r"(attn\d?|ff(_context)?)$")
    apply_icc_cache(m, cfg, {"transformer_blocks.0.ff": (A1, B1)})
    xs = [[1.0, 1.0], [2.0, 2.0], [3.0, 2.0], [4.0, 4.0], [6.0, 6.0]]
    got = [m(torch.tensor([x])).tolist()[0] for x in xs]
    # schedule: step 0 (warmup) and 1 full, then every 3rd: steps 2 and 3 cached, 4 full
    assert ff.calls == 3 and icc_state(m).full_steps == 3
    # step 2: from steps 0 and 1, y_f = [4, 6] + ([4, 6] - [2, 3]) = [6, 9], z_f = 2 + (2 - 1) = 3;
    # x = [3, 2]: B x - z_f = 0, so y = [6, 9]. Step 3: y_f = [4, 6] + 2 [2, 3] = [8, 12], z_f = 4, B x = 4
    assert got == [[2.0, 3.0], [4.0, 6.0], [6.0, 9.0], [8.0, 12.0], [12.0, 18.0]]
    remove_icc_cache(m)
    assert m(torch.tensor([[3.0, 2.0]])).tolist() == [[6.0, 6.0]] and ff.calls == 4


@torch.no_grad()
def test_residual_stats_by_hand():
    m = Dummy()
    cfg = ICCConfig(rank=1, method="rrr", granularity="module", full_every=2, forecast=0)
    xs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 1.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 3.0]])]
    (xx, xy), = residual_stats(m, cfg, lambda: [m(x) for x in xs]).values()
    # cached steps 1 and 3 against reuse of steps 0 and 2: dx = [1, 1] and [1, 2], dy = W dx = [2, 3], [2, 6]
    assert xx.tolist() == [[2.0, 3.0], [3.0, 5.0]] and xy.tolist() == [[4.0, 9.0], [6.0, 15.0]]
    A, B = rrr_factors(xx, xy, rank=1, ridge=1e-12)
    # dy = W dx exactly (two independent rows determine the 2 x 2 map): the rank-1 fit keeps W's direction
    # that explains the most of these dy, and its output direction is a unit vector
    assert abs(float(A.norm()) - 1) <= 4 * U32
    with pytest.raises(ICCError, match="no step its schedule would cache"):
        residual_stats(m, cfg, lambda: m(xs[0]))


def test_rrr_against_lstsq_and_exact_recovery():
    g = torch.Generator().manual_seed(0)
    dx = torch.randn(400, 6, generator=g, dtype=torch.float64)
    M = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g, dtype=torch.float64)
    dy = dx @ M + 0.3 * torch.randn(400, 5, generator=g, dtype=torch.float64)
    for rank in (1, 2, 4):
        A, B = rrr_factors(dx.T @ dx, dx.T @ dy, rank, ridge=1e-2)
        # the same estimator by another route (normal equations + eigh vs lstsq + SVD), both float64, then
        # rounded to float32 factors: agreement within a few float32 roundings of |A||B| (the rank-r subspace
        # is well separated here: the fitted singular values are ~(30, 10, 1, ...))
        assert_close_rel((B.T @ A.T).double(), rrr_factors_naive(dx, dy, rank, ridge=1e-2), 50 * U32)
    A, B = rrr_factors(dx.T @ dx, dx.T @ (dx @ M), 2, ridge=1e-12)        # noiseless rank-2 map: recovered
    assert_close_rel((B.T @ A.T).double(), M, 50 * U32)


def _calls(model, n=7, seed=1):
    return dit_calls(model, n, seed)


@torch.no_grad()
def test_tiny_dit_forecast_with_full_rank_is_exact_and_modules_beat_their_forecast():
    ref = _calls(tiny_dit())
    m = tiny_dit()
    cfg = ICCConfig(rank=16, method="svd", full_every=3, forecast=2)
    apply_icc_cache(m, cfg, compute_factors(m, cfg, allow_full_rank=True))
    # y_f + W (x - x_f) = W x in exact arithmetic (extrapolation commutes with W): as in test_icc's full-rank
    # case, plus the forecast's own rounding (a few ops on O(1) values), within 1e-4 of the output scale
    for a, b in zip(_calls(m), ref):
        assert_close_rel(a, b, 1e-4)
    remove_icc_cache(m)
    errs = {}
    for method in ("reuse", "rrr"):
        cfg = ICCConfig(rank=4, method=method, granularity="module", full_every=2, warmup=2, forecast=1)
        apply_icc_cache(m, cfg, calibrate(m, cfg, run=lambda: _calls(m, 7, seed=2)))   # calibrated on other inputs
        errs[method] = sum((a - b).norm() / b.norm() for a, b in zip(_calls(m), ref)).item()
        assert icc_state(m).full_steps == 5                                # steps 0, 1 (warmup), 2, 4, 6 of 7
        remove_icc_cache(m)
    # the regression removes 40-55% of the forecast's error (rrr / reuse measured 0.46-0.63 over 3 model x 2
    # input seeds); 0.8 holds for all six, and a correction that is off (zero factors) or of the wrong sign
    # gives >= 1
    assert errs["rrr"] < 0.8 * errs["reuse"], errs


def test_config_round_trip_and_bad_input(tmp_path):
    m = tiny_dit()
    cfg = ICCConfig(rank=4, method="rrr", granularity="module", full_every=3, warmup=2, forecast=1)
    factors = calibrate(m, cfg, run=lambda: _calls(m))
    save_factors(tmp_path, factors, cfg)
    back, cfg2 = load_factors(tmp_path)
    assert cfg2 == cfg and all(torch.equal(back[k][0], factors[k][0]) for k in factors)
    with pytest.raises(ICCError, match="use method='rrr'"):
        ICCConfig(method="svd", granularity="module")
    with pytest.raises(ICCError, match="fitted to a fixed schedule"):
        ICCConfig(method="rrr", threshold=0.1)
    with pytest.raises(ICCError, match="forecast=5"):
        ICCConfig(forecast=5)
    with pytest.raises(ICCError, match="needs run="):
        calibrate(m, cfg)
    with pytest.raises(ICCError, match="another model: recalibrate"):
        apply_icc_cache(m, cfg, {k: (v[0][:, :2], v[1][:2]) for k, v in factors.items()} | {"x": factors[next(iter(factors))]})


def test_cli_convert_icc_module_rrr(tmp_path, capsys):
    import json

    from conversion.cli import main
    from hf_ext.dit_cache import load_icc_transformer

    tiny_dit().save_pretrained(tmp_path / "dit")
    out = tmp_path / "icc"
    assert main(["convert", "icc", "--model", str(tmp_path / "dit"), "--rank", "4", "--method", "rrr",
                 "--granularity", "module", "--forecast", "1", "--warmup", "2", "--calib-steps", "8",
                 "--dev-samples", "2", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["ridge"] in RIDGES                                               # --ridge auto: chosen on the grid
    # 2 blocks x (attn1, ff); of 8 steps, 0 and 1 (warmup), 2, 4, 6 are full
    assert r["layers"] == 4 and r["full_steps"] == 5 and r["steps"] == 8 and 0 < r["macs_saved"] < 1
    model, cfg = load_icc_transformer(out)
    assert (cfg.granularity, cfg.method, cfg.forecast, cfg.warmup, cfg.ridge) == ("module", "rrr", 1, 2, r["ridge"])
    assert main(["convert", "icc", "--model", str(tmp_path / "dit"), "--method", "rrr", "--granularity", "module",
                 "--ridge", "small", "--out", str(tmp_path / "x")]) == 2
    assert "--ridge 'small'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["convert", "icc", "--model", str(tmp_path / "dit"), "--method", "svd", "--granularity", "module",
                 "--out", str(tmp_path / "x")]) == 2
    assert "use method='rrr'" in capsys.readouterr().err and not (tmp_path / "x").exists()


@torch.no_grad()
def test_select_ridge_keeps_the_ridge_closest_on_the_dev_run_and_leaves_the_model_bare():
    m = tiny_dit()
    cfg = ICCConfig(rank=2, method="rrr", granularity="module", full_every=3, warmup=1, forecast=1)
    dev = lambda: _calls(m, seed=2)[-1]                                   # noqa: E731  (the final output)
    ref = dev()
    ridges = (1e-3, 1e-1, 10.0)
    chosen, factors, scores = select_ridge(m, cfg, lambda: _calls(m), dev, ridges)
    assert list(scores) == list(ridges) and chosen.ridge == min(scores, key=scores.get)
    assert (chosen.rank, chosen.full_every, chosen.forecast) == (cfg.rank, cfg.full_every, cfg.forecast)
    assert torch.equal(dev(), ref)                                        # every hook removed
    again = compute_factors(m, chosen, residual_stats(m, cfg, lambda: _calls(m)))
    assert all(torch.equal(factors[k][0], again[k][0]) and torch.equal(factors[k][1], again[k][1]) for k in again)
    apply_icc_cache(m, chosen, factors)                                   # the score is this run's error
    assert float(((dev() - ref) ** 2).mean()) == scores[chosen.ridge]
    remove_icc_cache(m)
    with pytest.raises(ICCError, match="not 'svd'"):
        select_ridge(m, ICCConfig(rank=2, method="svd"), lambda: _calls(m), dev)
    with pytest.raises(ICCError, match="positive relative ridges"):
        select_ridge(m, cfg, lambda: _calls(m), dev, (0.0, 1.0))
    with pytest.raises(ICCError, match="final sample as a tensor"):
        select_ridge(m, cfg, lambda: _calls(m), lambda: _calls(m, seed=2))


@torch.no_grad()
def test_a_new_sampling_run_starts_from_a_fresh_cache():
    # diffusers resets hook state only for CacheMixin models; a rising timestep marks a new run for the rest
    m = tiny_dit()
    cfg = ICCConfig(rank=4, method="rrr", granularity="module", full_every=3, warmup=1, forecast=1)
    stats = residual_stats(m, cfg, lambda: _calls(m))
    twice = residual_stats(m, cfg, lambda: (_calls(m), _calls(m)))
    # the second run adds the first run's sums again: equal up to reassociating 8 float64 terms (8 * 2^-53 of
    # their scale); without the reset it would forecast from the first run's last steps, off by O(1)
    for k in stats:
        assert_close_rel(twice[k][0], 2 * stats[k][0], 1e-12)
        assert_close_rel(twice[k][1], 2 * stats[k][1], 1e-12)
    apply_icc_cache(m, cfg, compute_factors(m, cfg, stats))
    first, second = _calls(m), _calls(m)
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and icc_state(m).step == 7


@torch.no_grad()
def test_a_new_run_is_seen_when_the_timestep_is_passed_positionally():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                 caption_channels=4, norm_num_groups=1).eval()
    caption = torch.ones(2, 1, 4)                                   # PixArt takes (hidden, caption, timestep, ...)
    cond = {"resolution": None, "aspect_ratio": None}

    def sampling_run():
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        return [m(x + 0.05 * t, caption, torch.tensor([900 - 100 * t] * 2), cond).sample for t in range(5)]
    apply_icc_cache(m, ICCConfig(rank=1, method="reuse", granularity="module", full_every=2, forecast=1), {})
    first, second = sampling_run(), sampling_run()
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and icc_state(m).step == 5
