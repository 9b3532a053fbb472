"""How much the RRR correction's gain depends on its calibration run (trained tiny DiT), side by side.

    python benchmarks/dit_cache_robustness.py --out benchmarks/results/dit_cache_robustness.json

A protocol other than benchmarks/dit_cache.py's: ``ddim_trajectory`` (DDIM ``--steps`` steps, CFG 1.5,
random classes), ``--samples`` samples per measurement seed (5, 6, 7). The module forecast (granularity
"module", forecast 1, full every 2 after a warmup of 2) runs bare ("reuse") and RRR-corrected (rank 8), the
RRR factors calibrated on seeds 0 and 1 with ``--calib-samples`` samples, with the default ridge (1e-3) and
with the ridge ``select_ridge`` chooses closed loop on a development run (seed 2, ``--dev-samples`` samples;
the grid ``RIDGES``). Reported: the PSNR gain of RRR over the bare forecast (latents, peak-to-peak 2) for each
(calibration, measurement) seed pair.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from hf_ext.dit_cache import ICCConfig, apply_icc_cache, calibrate, remove_icc_cache  # noqa: E402
from hf_ext.dit_cache.calibration import RIDGES, ddim_trajectory, select_ridge  # noqa: E402


def psnr(a, b) -> float:
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))


@torch.no_grad()
def main():
    from diffusers import DiTTransformer2DModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE.parent / "tests/fixtures/tiny_dit"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--dev-samples", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/dit_cache_robustness.json")
    args = ap.parse_args()
    dit = DiTTransformer2DModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    schedule = dict(granularity="module", forecast=1, full_every=2, warmup=2)
    refs = {ms: ddim_trajectory(dit, samples=args.samples, steps=args.steps, seed=ms) for ms in (5, 6, 7)}
    apply_icc_cache(dit, ICCConfig(rank=8, method="reuse", **schedule), {})
    bare = {ms: psnr(ddim_trajectory(dit, samples=args.samples, steps=args.steps, seed=ms), ref) for ms, ref in refs.items()}
    remove_icc_cache(dit)
    rows = []
    for n in args.calib_samples:
        for cs in (0, 1):
            cfg = ICCConfig(rank=8, method="rrr", **schedule)
            calib = partial(ddim_trajectory, dit, samples=n, steps=args.steps, seed=cs)
            chosen, chosen_factors, scores = select_ridge(
                dit, cfg, calib, partial(ddim_trajectory, dit, samples=args.dev_samples, steps=args.steps, seed=2))
            for ridge, c, f in (("default", cfg, calibrate(dit, cfg, calib)), ("selected", chosen, chosen_factors)):
                apply_icc_cache(dit, c, f)
                for ms, ref in refs.items():
                    got = psnr(ddim_trajectory(dit, samples=args.samples, steps=args.steps, seed=ms), ref)
                    rows.append({"calib_samples": n, "calib_seed": cs, "ridge": ridge, "ridge_value": c.ridge,
                                 "seed": ms, "forecast_psnr_db": bare[ms], "rrr_psnr_db": got, "gain_db": got - bare[ms]})
                    print(json.dumps(rows[-1]), flush=True)
                remove_icc_cache(dit)
    summary = [{"calib_samples": n, "ridge": ridge, "min_gain_db": min(g), "max_gain_db": max(g),
                "mean_gain_db": sum(g) / len(g)}
               for n in args.calib_samples for ridge in ("default", "selected")
               for g in [[r["gain_db"] for r in rows if r["calib_samples"] == n and r["ridge"] == ridge]]]
    print(json.dumps(summary, indent=1))
    res = {"title": "ICC RRR modules + forecast: gain over the bare module forecast, by calibration run",
           "command": "python benchmarks/dit_cache_robustness.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "sections": {"Gain": {"note": f"DDIM {args.steps} steps, {args.samples} samples per seed, rank 8, full "
                                 f"every 2 after 2; ridge grid {RIDGES}, chosen on seed 2 ({args.dev_samples} samples).", "rows": rows, "summary": summary}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
