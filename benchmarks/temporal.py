"""TFMQ on the trained tiny DiT: quantized samples vs full precision, and the real CPU speed, in one run.

    python benchmarks/temporal.py --out benchmarks/results/temporal.json

Model: tests/fixtures/tiny_dit (``benchmarks/train_tiny_dit.py``). Sampling: DDIM 35 steps, CFG 1.5 (cond
and uncond in one batch of 2 x ``--samples``), fixed seeds and labels; every method starts from the same
noise. Calibration: one run of 16 other samples (other seed, other labels).

Quality (simulated quantize-dequantize, so it measures accuracy only), W8A8 and W4A8:
- naive PTQ: one activation range per layer (min/max over all steps); temporal layers quantized;
- finite-set: one activation range per layer and sampler step; temporal layers quantized;
- TFMQ (cache): finite-set ranges, temporal features from the full-precision per-step table;
- TFMQ (auto): per temporal module, the table only where quantizing it moves its output > 1%;
- torchao W8A8 (real int8 kernels, dynamic per-token activation ranges) for reference.
PSNR and SSIM (torchmetrics) of the final samples against the full-precision ones, on [0, 1] pixels.
FID-style feature statistics are not reported: 64 samples of 16 px give no meaningful FID.

Speed: one denoiser call (the batch above) per configuration, interleaved rounds, median; fp32 vs the
temporal cache alone vs torchao int8 (eager, and under torch.compile against compiled fp32).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from dit_cache import psnr, ssim  # noqa: E402
from train_tiny_dit import sample  # noqa: E402

from hf_ext.macs import count_macs  # noqa: E402
from hf_ext.temporal import apply_temporal_cache  # noqa: E402
from hf_ext.temporal.quant import TFMQConfig, quantize_tfmq, quantize_torchao, remove_tfmq  # noqa: E402

STEPS, GUIDANCE = 35, 1.5


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)   # as sample() uses


def quality(model, labels, ref, calib) -> list[dict]:
    sched, rows = scheduler(), []
    methods = {"naive PTQ (min/max, all steps)": dict(calibration="minmax", temporal="quantize"),
               "finite-set calibration": dict(calibration="finite-set", temporal="quantize"),
               "TFMQ (cache)": dict(calibration="finite-set", temporal="cache"),
               "TFMQ (auto, disturbance > 1%)": dict(calibration="finite-set", temporal="auto", max_disturbance=0.01)}
    for bits in (8, 4):
        for name, kw in methods.items():
            state = quantize_tfmq(model, TFMQConfig(weight_bits=bits, **kw), sched, STEPS, run=calib)
            out = sample(model, labels, STEPS, GUIDANCE, 0)
            remove_tfmq(model)
            rows.append({"bits": f"W{bits}A8", "method": name, "psnr_db": psnr(out, ref), "ssim": ssim(out, ref),
                         "cached_temporal_modules": len(state["cached"]), "kernels": "simulated"})
            print(json.dumps(rows[-1]), flush=True)
    q = copy.deepcopy(model)
    quantize_torchao(q)
    out = sample(q, labels, STEPS, GUIDANCE, 0)
    rows.append({"bits": "W8A8", "method": "torchao dynamic (real int8 kernels)", "psnr_db": psnr(out, ref),
                 "ssim": ssim(out, ref), "cached_temporal_modules": 0, "kernels": "torchao int8"})
    print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def speed(model, labels, rounds: int) -> tuple[list[dict], dict]:
    sched = scheduler()
    sched.set_timesteps(STEPS)
    t = sched.timesteps[STEPS // 2]
    x = torch.randn(2 * len(labels), 3, model.config.sample_size, model.config.sample_size,
                    generator=torch.Generator().manual_seed(0))
    y = torch.cat([labels, torch.full_like(labels, model.config.num_embeds_ada_norm)])
    call = lambda m: m(x, timestep=t.expand(len(x)), class_labels=y).sample  # noqa: E731
    cached = copy.deepcopy(model)
    apply_temporal_cache(cached, sched, STEPS)
    int8 = copy.deepcopy(model)
    quantize_torchao(int8)
    int8_cached = copy.deepcopy(int8)
    apply_temporal_cache(int8_cached, sched, STEPS)
    with count_macs() as full_macs:
        call(model)
    with count_macs() as cached_macs:
        call(cached)
    configs = {"fp32": model, "fp32 + temporal cache": cached, "torchao int8": int8,
               "torchao int8 + temporal cache": int8_cached}
    compile_s = {}
    for name, m in (("fp32, torch.compile", model), ("torchao int8, torch.compile", int8)):
        c = torch.compile(copy.deepcopy(m))
        t0 = time.perf_counter()
        call(c)
        compile_s[name] = time.perf_counter() - t0
        configs[name] = c
    times = {k: [] for k in configs}
    for _ in range(rounds):
        for name, m in configs.items():
            t0 = time.perf_counter()
            call(m)
            times[name].append(time.perf_counter() - t0)
    base, base_c = statistics.median(times["fp32"]), statistics.median(times["fp32, torch.compile"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        ref = base_c if "compile" in name else base
        rows.append({"config": name, "ms_per_step": 1e3 * med, "speedup": ref / med,
                     "vs": "fp32, torch.compile" if "compile" in name else "fp32 eager"})
    macs = {"linear_macs_per_step_fp32": full_macs.by_op["linear"], "linear_macs_per_step_cached": cached_macs.by_op["linear"],
            "temporal_share_of_macs": 1 - cached_macs.total / full_macs.total, "compile_seconds": compile_s}
    return rows, macs


def main():
    from diffusers import DiTTransformer2DModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE.parent / "tests/fixtures/tiny_dit"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    ap.add_argument("--out", default="benchmarks/results/temporal.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    model = DiTTransformer2DModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    classes = model.config.num_embeds_ada_norm
    labels = torch.arange(args.samples) % classes
    calib_labels = (torch.arange(16) * 7 + 3) % classes
    ref = sample(model, labels, STEPS, GUIDANCE, 0)
    rows = quality(model, labels, ref, lambda: sample(model, calib_labels, STEPS, GUIDANCE, 123))
    speed_rows, macs = speed(model, labels, args.rounds)
    res = {"title": "TFMQ: timestep-aware quantization of the tiny DiT",
           "command": "python benchmarks/temporal.py", "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "sections": {
               "Quality vs full precision": {"note": f"{args.samples} samples, DDIM {STEPS} steps, CFG {GUIDANCE}. "
                                             "'simulated' rows quantize-dequantize in fp32 (accuracy only).", "rows": rows},
               "Wall clock per denoiser call": {
                   "note": f"batch {2 * args.samples} (CFG), median of {args.rounds} interleaved rounds. The temporal "
                           f"cache removes {macs['temporal_share_of_macs']:.2%} of the MACs of a call "
                           f"({macs['linear_macs_per_step_fp32'] / 1e6:.0f} -> "
                           f"{macs['linear_macs_per_step_cached'] / 1e6:.0f} M linear MACs). Compile time (s): "
                           + ", ".join(f"{k} {v:.0f}" for k, v in macs["compile_seconds"].items()) + ".",
                   "rows": speed_rows}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for r in speed_rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
