"""ICC and TaylorSeer CPU wall clock on a DiT-S/2-sized transformer: MACs saved vs time saved, side by side.

    python benchmarks/dit_cache_speed.py --out benchmarks/results/dit_cache_speed.json

Model: diffusers ``DiTTransformer2DModel`` with DiT-S/2's shape (width 384, 6 heads, 12 layers, patch 2 on a
32x32x4 latent: 256 tokens; 4 output channels, no learned sigma), random weights (speed does not depend on them), float32. One image, DDIM
``--steps`` steps, classifier-free guidance (cond and uncond batched: batch 2). Per method, the setting of
its grid whose measured MAC saving is nearest ``--target``; then ``--repeats`` interleaved (uncached,
cached) timings of the whole sampling run, median ratio. Also per method: the mean time of a full and of a
cached transformer call, which shows what a cached step still pays for. Run it with nothing else on the
machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from dit_cache import TAYLORSEER_TARGETS, run, strip  # noqa: E402

from hf_ext.dit_cache import ICCConfig, apply_icc_cache, calibrate, remove_icc_cache  # noqa: E402


def dit_s2():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=4,
                                 num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()


def grids(model, calib_run):
    """method -> [(setting, apply, remove)]: the settings that span about 35-60% MACs saved."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    def icc(cfg):
        f = calibrate(model, cfg, calib_run)
        return lambda m: apply_icc_cache(m, cfg, f)

    out = {"TaylorSeer": [], "ICC RRR modules + forecast": [], "ICC CA-SVD": [], "ICC CA-SVD + forecast": []}
    for n, warm in ((2, 2), (2, 4), (2, 8), (3, 4)):
        cfg = TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=warm, taylor_factors_dtype=torch.float32,
                                    cache_identifiers=TAYLORSEER_TARGETS)
        out["TaylorSeer"].append((f"interval={n} warmup={warm}", lambda m, c=cfg: apply_taylorseer_cache(m, c), strip))
        cfg = ICCConfig(rank=8, method="rrr", granularity="module", full_every=n, warmup=warm, forecast=1)
        out["ICC RRR modules + forecast"].append((f"N={n} warmup={warm} r=8", icc(cfg), remove_icc_cache))
    for n, r in ((2, 16), (3, 32), (3, 64), (4, 64)):
        for fc, name in ((0, "ICC CA-SVD"), (1, "ICC CA-SVD + forecast")):
            cfg = ICCConfig(rank=r, method="ca-svd", full_every=n, forecast=fc)
            out[name].append((f"N={n} r={r}", icc(cfg), remove_icc_cache))
    return out


def call_times(model, labels, steps):
    """Seconds of each transformer call of one sampling run, and whether the cache ran it in full."""
    times, t0 = [], [0.0]

    def pre(m, a, k):
        t0[0] = time.perf_counter()

    def post(m, a, k, y):
        times.append(time.perf_counter() - t0[0])
    h = [model.register_forward_pre_hook(pre, with_kwargs=True), model.register_forward_hook(post, with_kwargs=True)]
    try:
        run(model, labels, 0, {}, steps=steps, count=False)
    finally:
        for x in h:
            x.remove()
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=35)
    ap.add_argument("--target", type=float, default=0.45)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/dit_cache_speed.json")
    args = ap.parse_args()
    model = dit_s2()
    labels = torch.tensor([207])
    _, base_macs, _ = run(model, labels, 0, {}, steps=args.steps)
    grid = grids(model, lambda: run(model, torch.tensor([1, 2]), 123, {}, steps=args.steps))
    rows = []
    for method, settings in grid.items():
        measured = []
        for setting, apply, remove in settings:
            apply(model)
            try:
                macs = run(model, labels, 0, {}, steps=args.steps)[1]
            finally:
                remove(model)
            measured.append((abs(1 - macs / base_macs - args.target), 1 - macs / base_macs, setting, apply, remove))
            print(method, setting, f"{1 - macs / base_macs:.3f}", flush=True)
        _, saved, setting, apply, remove = min(measured, key=lambda m: m[0])
        ratios = []
        for _ in range(args.repeats):
            base = run(model, labels, 0, {}, steps=args.steps, count=False)[2]
            apply(model)
            try:
                ratios.append(base / run(model, labels, 0, {}, steps=args.steps, count=False)[2])
            finally:
                remove(model)
        ref_calls = call_times(model, labels, args.steps)
        apply(model)
        try:
            calls = call_times(model, labels, args.steps)
        finally:
            remove(model)
        speedup = statistics.median(ratios)
        # a call is "cached" when it took under 3/4 of the uncached call's median (full calls take about as long)
        full_ms = statistics.median(ref_calls) * 1e3
        cached = [t * 1e3 for t in calls if t * 1e3 < 0.75 * full_ms]
        rows.append({"method": method, "setting": setting, "macs_saved": saved, "time_saved": 1 - 1 / speedup,
                     "time_saved_per_mac_saved": (1 - 1 / speedup) / saved, "cpu_speedup": speedup,
                     "full_call_ms": full_ms, "cached_call_ms": statistics.median(cached) if cached else None,
                     "cached_calls": len(cached)})
        print(json.dumps(rows[-1]), flush=True)
    res = {"title": "ICC vs TaylorSeer: CPU wall clock on a DiT-S/2-sized transformer (random weights)",
           "command": "python benchmarks/dit_cache_speed.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "sections": {"Speed": {"note": f"1 image, DDIM {args.steps} steps, CFG batched (batch 2), 256 tokens, float32; "
                                  f"per method its setting nearest {args.target:.0%} MACs saved; speedup: median of "
                                  f"{args.repeats} interleaved (uncached, cached) runs; call times: medians.",
                                  "rows": rows}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
