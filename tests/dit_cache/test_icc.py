"""ICC hooks: hand-checkable dummy blocks, a tiny DiT (bit-identical when full, exact at full rank), bad input."""
from __future__ import annotations

import pytest
import torch

from hf_ext.dit_cache import ICCConfig, ICCError, apply_icc_cache, calibrate, icc_state, remove_icc_cache
from hf_ext.dit_cache.ops import ca_svd_factors, icc_step, icc_step_naive, icc_step_projected, svd_factors
from dit_tiny import dit_calls, tiny_dit
from numerics import U32, assert_close_rel, gamma

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = torch.nn.Module()
        self.ff.net = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity(), torch.nn.Linear(2, 2, bias=False)])
        self.ff.net[2].weight.data = torch.tensor([[2.0, 0.0], [0.0, 3.0]])

    def forward(self, x):
        return torch.relu(self.ff.net[2](x))


class Dummy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([Block()])

    def forward(self, x):
        return self.transformer_blocks[0](x)


@torch.no_grad()
def test_dummy_block_by_hand():
    # every value below is a small integer or half-integer and so is every product and sum on the way, so
    # float32 computes them exactly on any kernel: == is exact arithmetic, not one machine's rounding
    m = Dummy()
    A, B = torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0, 0.0]])       # rank 1: keeps only W[0, 0] = 2
    apply_icc_cache(m, ICCConfig(rank=1, method="svd", full_every=2), {"transformer_blocks.0.ff.net.2": (A, B)})
    assert m(torch.tensor([[1.0, 1.0]])).tolist() == [[2.0, 3.0]]          # full: W x
    # cached: y_hat + A B (x - x_hat) = [2, 3] + [2 * 1, 0] = [4, 3] (exact would be [4, 6])
    assert m(torch.tensor([[2.0, 2.0]])).tolist() == [[4.0, 3.0]]
    assert m(torch.tensor([[-1.0, 1.0]])).tolist() == [[0.0, 3.0]]         # full again; relu recomputed exactly
    st = icc_state(m)
    # full steps: W x (2 x 2) plus the projection ẑ = B x (1 x 2); the cached step: (2 + 2) x rank 1
    assert (st.step, st.full_steps, st.macs) == (3, 2, 2 * (4 + 2) + 1 * (2 + 2) * 1)
    remove_icc_cache(m)
    assert m(torch.tensor([[2.0, 2.0]])).tolist() == [[4.0, 6.0]]


@torch.no_grad()
def test_adaptive_schedule_recomputes_when_the_increment_is_large():
    # exact as above (dyadic values); the increments 0.35 and 2 sit far from the threshold 0.5, so the
    # full/cached decisions do not depend on rounding either
    m = Dummy()
    A, B = torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0, 0.0]])
    apply_icc_cache(m, ICCConfig(rank=1, method="svd", threshold=0.5), {"transformer_blocks.0.ff.net.2": (A, B)})
    assert m(torch.tensor([[1.0, 1.0]])).tolist() == [[2.0, 3.0]]                     # first call: full
    # ||x - x̂|| / ||x̂|| = 0.5 / 1.41 < 0.5: cached, ŷ + A B (x - x̂) = [2 + 2 * 0.5, 3]
    assert m(torch.tensor([[1.5, 1.0]])).tolist() == [[3.0, 3.0]]
    assert m(torch.tensor([[3.0, 3.0]])).tolist() == [[6.0, 9.0]]                     # 2.83 / 1.41 > 0.5: full
    st = icc_state(m)
    assert (st.step, st.full_steps) == (3, 2)


@torch.no_grad()
def test_channel_stats_of_activations_and_of_increments_by_hand():
    from hf_ext.dit_cache import channel_stats

    m, cfg = Dummy(), ICCConfig(rank=1, method="cd-svd")
    xs = [torch.tensor([[1.0, -1.0]]), torch.tensor([[3.0, 1.0]]), torch.tensor([[2.0, 1.0]])]
    run = lambda: [m(x) for x in xs]  # noqa: E731
    # sums of small integers divided by 3 or 2 with exact quotients: IEEE division is correctly rounded, so exact
    (mx, my), = channel_stats(m, cfg, run).values()
    assert mx.tolist() == [2.0, 1.0] and my.tolist() == [4.0, 3.0]           # mean |x|; W = diag(2, 3)
    (dx, dy), = channel_stats(m, cfg, run, increments=True).values()
    assert dx.tolist() == [1.5, 1.0] and dy.tolist() == [3.0, 3.0]           # |Δx| = [2, 2], [1, 0]
    with pytest.raises(ICCError, match="at least twice"):
        channel_stats(m, cfg, lambda: m(xs[0]), increments=True)


def _abs(t):
    return t.double().abs()


def _assert_within(got, want, bound):
    """|got - want| <= bound elementwise (all float64)."""
    err = (got.double() - want.double()).abs()
    assert bool((err <= bound).all()), f"worst error / bound = {float((err / bound).max()):.3g}"


@torch.no_grad()
def test_reuse_and_ops_against_naive():
    g = torch.Generator().manual_seed(0)
    W, x, xh = torch.randn(12, 8, generator=g), torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    yh = xh @ W.T
    n, r = 8, 3
    for A, B in (svd_factors(W, r), ca_svd_factors(W, torch.rand(8, generator=g), torch.rand(12, generator=g), r)):
        naive = icc_step_naive(x, xh, yh, A, B)          # (A B) in float64, rounded once to float32
        # Higham, elementwise: fl(x - x̂) costs u, the two products (length n, then r) gamma(n + r), the add u,
        # and the naive reference's final rounding u: within gamma(n + r + 3) (|ŷ| + |A| |B| |x - x̂|) of each other
        bound = gamma(n + r + 3) * (_abs(yh) + (_abs(x - xh) @ _abs(B).T) @ _abs(A).T)
        _assert_within(icc_step(x, xh, yh, A, B), naive, bound)
        zh = xh.reshape(-1, 8) @ B.T
        # the projected form subtracts B x - ẑ after rounding both products, so its error scales with
        # |B| (|x| + |x̂|) rather than with |B| |x - x̂|
        bound = gamma(n + r + 3) * (_abs(yh) + (_abs(B) @ (_abs(x) + _abs(xh)).unsqueeze(-1)).squeeze(-1) @ _abs(A).T)
        _assert_within(icc_step_projected(x, zh, yh, A, B), naive, bound)
    A, B = svd_factors(W, 8)                                               # full rank: the exact increment
    E = _abs(A.double() @ B.double() - W.double())                         # the SVD's own reconstruction error
    # LAPACK's SVD is backward stable: ||U S Vᵀ - W|| <= p(n) u ||W||_2 with p(n) a small multiple of n (measured
    # 1.1 n u ||W||_2 here); a wrong factor (a dropped singular value, a transposed V) is off by O(||W||)
    assert float(E.max()) <= 10 * n * U32 * float(torch.linalg.matrix_norm(W.double(), 2))
    # ŷ + A B (x - x̂) = W x̂ + (W + E)(x - x̂): the rounding of ŷ = x̂ Wᵀ (gamma(n)) and of the reference x Wᵀ
    # (gamma(n)), the cached step's own (as above), and E (x - x̂)
    dx = _abs(x - xh)
    bound = (gamma(n) * (_abs(xh) + _abs(x)) @ _abs(W).T + dx @ E.T
             + gamma(n + 8 + 3) * (_abs(yh) + (dx @ _abs(B).T) @ _abs(A).T))
    _assert_within(icc_step(x, xh, yh, A, B), x @ W.T, bound)
    assert icc_step(x, xh, yh, None, None) is yh


def _calls(model, n=4):
    return dit_calls(model, n)


@torch.no_grad()
def test_tiny_dit_full_every_step_is_bit_identical_and_full_rank_is_exact():
    ref = _calls(tiny_dit())
    m = tiny_dit()
    apply_icc_cache(m, ICCConfig(rank=1, method="reuse", full_every=1), {})
    # bit for bit on every machine: a full step runs each layer's own forward on the same values and shapes,
    # into fresh (aligned) tensors, so the same kernels compute the same bits as without the hooks
    assert all(torch.equal(a, b) for a, b in zip(_calls(m), ref))
    remove_icc_cache(m)
    cfg = ICCConfig(rank=16, method="svd", full_every=4)                   # every targeted layer is 16 x 16+
    from hf_ext.dit_cache import compute_factors
    apply_icc_cache(m, cfg, compute_factors(m, cfg, allow_full_rank=True))
    got = _calls(m)
    assert icc_state(m).full_steps == 1
    # cached steps with exact linear increments: equal to the uncached outputs in exact arithmetic. Each cached
    # linear adds about gamma(fan-in <= 64 + 16) ~ 5e-6 of its terms' size (the SVD's reconstruction error is
    # of the same order), ~20 dependent ops from input to output, outputs O(1) (max 1.8): within 1e-4 of the
    # output scale everywhere (measured 2.7e-7); naive reuse instead is off by 4e-2, every correction with the
    # wrong sign by 3e-3
    for a, b in zip(got, ref):
        assert_close_rel(a, b, 1e-4)


@torch.no_grad()
def test_correction_beats_reuse_and_ca_svd_calibrates():
    ref = _calls(tiny_dit())
    errs = {}
    for method in ("reuse", "svd", "ca-svd", "cd-svd"):
        m = tiny_dit()
        cfg = ICCConfig(rank=8, method=method, full_every=4)
        apply_icc_cache(m, cfg, calibrate(m, cfg, run=lambda: _calls(m, 2)))
        errs[method] = sum((a - b).norm() / b.norm() for a, b in zip(_calls(m)[1:], ref[1:])).item()
    # each correction removes a quarter to a third of reuse's error here (error / reuse's: svd 0.75, ca-svd
    # 0.67, cd-svd 0.65); over 3 model x 3 input seeds the ratios were 0.56-0.75, 0.49-0.88 and 0.43-0.66.
    # 0.9 holds for all nine; a correction switched off or zeroed factors give 1.0
    for method in ("svd", "ca-svd", "cd-svd"):
        assert errs[method] < 0.9 * errs["reuse"], errs


def test_bad_input():
    m = tiny_dit()
    with pytest.raises(ICCError, match="rank=16 >= min"):
        apply_icc_cache(m, ICCConfig(rank=16, method="svd"))
    with pytest.raises(ICCError, match="no linear layer matching"):
        apply_icc_cache(torch.nn.Sequential(torch.nn.Linear(2, 2)), ICCConfig(rank=1, method="svd"))
    other = {"transformer_blocks.0.attn1.to_q": (torch.zeros(32, 4), torch.zeros(4, 32))}
    with pytest.raises(ICCError, match="another model: recalibrate"):
        apply_icc_cache(m, ICCConfig(rank=4, method="svd"), other)
    with pytest.raises(ICCError, match="needs calibration statistics|needs run="):
        calibrate(m, ICCConfig(rank=4, method="ca-svd"))
    apply_icc_cache(m, ICCConfig(rank=4, method="svd"))
    with pytest.raises(ICCError, match="already applied"):
        apply_icc_cache(m, ICCConfig(rank=4, method="svd"))
    with pytest.raises(ICCError, match="method 'fast' is unknown"):
        ICCConfig(method="fast")


def test_cli_convert_icc_saves_factors_that_load_back(tmp_path, capsys):
    import json

    from conversion.cli import main
    from hf_ext.dit_cache import load_icc_transformer

    tiny_dit().save_pretrained(tmp_path / "dit")
    out = tmp_path / "icc"
    assert main(["convert", "icc", "--model", str(tmp_path / "dit"), "--rank", "4", "--method", "ca-svd",
                 "--calib-steps", "4", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["layers"] == 12 and 0 < r["macs_saved"] < 1 and r["full_steps"] == 2 and r["steps"] == 4
    assert {"icc_factors.safetensors", "config.json", "README.md"} <= {p.name for p in out.iterdir()}
    model, cfg = load_icc_transformer(out)
    assert cfg.rank == 4 and cfg.method == "ca-svd" and model._hf_ext_icc is not None
    # the reported saving is the MACs the loaded factors really skip on the CLI's held-out run (2 samples,
    # 4 steps, seed 1): MAC counts are integers fixed by the shapes and the full/cached schedule, so exact
    from hf_ext.dit_cache.calibration import ddim_trajectory
    from hf_ext.macs import count_macs
    with count_macs() as cached:
        ddim_trajectory(model, 2, 4, seed=1)
    remove_icc_cache(model)
    with count_macs() as full:
        ddim_trajectory(model, 2, 4, seed=1)
    assert r["macs_saved"] == 1 - cached.total / full.total
    assert main(["convert", "icc", "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "holds no diffusers transformer" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_macs_are_counted_as_executed():
    from hf_ext.macs import count_macs

    m = Dummy()
    apply_icc_cache(m, ICCConfig(rank=1, method="reuse", full_every=2), {})
    with count_macs() as full:
        m(torch.ones(1, 2))
    with count_macs() as cached:
        m(torch.ones(1, 2))
    assert full.by_op["linear"] == 4 and cached.total == 0   # naive reuse runs no linear at all (integer counts)
    remove_icc_cache(m)
    A, B = torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0, 0.0]])
    apply_icc_cache(m, ICCConfig(rank=1, method="svd", full_every=2), {"transformer_blocks.0.ff.net.2": (A, B)})
    m(torch.ones(1, 2))                            # full: W x (2 x 2) and the projection ẑ = B x (1 x 2)
    with count_macs() as cached:                   # cached: B x (1 x 2), then the addmm with A (2 x 1)
        m(torch.ones(1, 2))
    assert cached.total == 4 and icc_state(m).macs == (4 + 2) + 4, cached.by_op
