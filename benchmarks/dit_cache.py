"""ICC vs other DiT caches on the trained tiny DiT, at matched measured MAC savings, side by side in one run.

    python benchmarks/dit_cache.py --out benchmarks/results/dit_cache.json

Model: tests/fixtures/tiny_dit (``benchmarks/train_tiny_dit.py``: a class-conditional pixel-space DiT trained
on 32x32 crops of real photos). Sampling: DDIM 35 steps, classifier-free guidance 1.5 (cond and uncond in one
batch), ``--samples`` samples with fixed seeds and labels; every method starts from the same noise. The
reference is the uncached model. MACs are counted as executed (``hf_ext.dit_cache.macs``), over the whole
sampling run. CA-SVD is calibrated on a separate run (other seeds and labels) of the uncached model.
For each target saving the row of each method is the setting (from its grid) whose measured saving is
closest to the target. PSNR is against the uncached samples, on [0, 1] pixels, mean over samples.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from train_tiny_dit import sample  # noqa: E402

from hf_ext.dit_cache import ICCConfig, apply_icc_cache, remove_icc_cache  # noqa: E402
from hf_ext.dit_cache.macs import count_macs  # noqa: E402

STEPS, GUIDANCE = 35, 1.5


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (((a - b) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-12)       # [-1, 1] -> [0, 1] pixels
    return float((10 * torch.log10(1 / mse)).mean())


def run(model, labels, seed, clock: dict):
    """One sampling run from fresh cache state: (samples, MACs executed, seconds). ``clock["t"]``: the timestep."""
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    reg = HookRegistry.check_if_exists_or_initialize(model)
    reg._child_registries_cache = None  # hooks were added to blocks since the last run
    reg.reset_stateful_hooks(recurse=True)
    _set_cache_context(model, CacheContext("cfg"))  # DiT is not a CacheMixin: one context for the batched CFG call
    with count_macs() as macs:
        t0 = time.perf_counter()
        out = sample(model, labels, STEPS, GUIDANCE, seed, on_step=lambda i, t: clock.__setitem__("t", int(t)))
        secs = time.perf_counter() - t0
    _set_cache_context(model, None)
    return out, macs.total, secs


def methods(model, calib_run, clock: dict):
    """name -> (apply(model) -> None, remove(model) -> None) for each setting of each method's grid."""
    from diffusers.hooks import (FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig,
                                 apply_first_block_cache, apply_pyramid_attention_broadcast, apply_taylorseer_cache)
    from diffusers.hooks.hooks import HookRegistry

    def strip(m):
        reg = HookRegistry.check_if_exists_or_initialize(m)
        for name in list(reg.hooks):
            reg.remove_hook(name, recurse=True)
        for sub in m.modules():
            r = getattr(sub, "_diffusers_hook", None)
            if r is not None:
                for name in list(r.hooks):
                    r.remove_hook(name, recurse=False)

    out = {}
    stats_cfg = ICCConfig(rank=1, method="ca-svd")
    from hf_ext.dit_cache import channel_stats, compute_factors

    stats = channel_stats(model, stats_cfg, calib_run)
    for n in (2, 3, 4):
        out[("reuse", f"N={n}")] = (lambda m, n=n: apply_icc_cache(m, ICCConfig(rank=1, method="reuse", full_every=n), {}),
                                    remove_icc_cache)
        for r in (8, 16, 32):
            for method in ("svd", "ca-svd"):
                cfg = ICCConfig(rank=r, method=method, full_every=n)
                f = compute_factors(model, cfg, stats if method == "ca-svd" else None)
                out[(f"ICC {method.upper()}", f"N={n} r={r}")] = (lambda m, cfg=cfg, f=f: apply_icc_cache(m, cfg, f),
                                                                  remove_icc_cache)
    for th in (0.02, 0.05, 0.1, 0.2, 0.4):
        out[("FirstBlockCache", f"threshold={th}")] = (
            lambda m, th=th: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=th)), strip)
    for n in (2, 3, 4, 6):
        out[("TaylorSeer", f"interval={n}")] = (
            lambda m, n=n: apply_taylorseer_cache(m, TaylorSeerCacheConfig(
                cache_interval=n, disable_cache_before_step=2, taylor_factors_dtype=torch.float32,
                # its default patterns (re.fullmatch "^transformer_blocks.*attn") miss DiT's attn1 / ff
                cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"])), strip)
    for n in (2, 3, 4):
        out[("PyramidAttentionBroadcast", f"skip={n}")] = (
            lambda m, n=n: apply_pyramid_attention_broadcast(m, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(0, 1000),
                current_timestep_callback=lambda: clock.get("t", 999))), strip)
    return out


def main():
    from diffusers import DiTTransformer2DModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE.parent / "tests/fixtures/tiny_dit"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.30, 0.45, 0.60])
    ap.add_argument("--out", default="benchmarks/results/dit_cache.json")
    args = ap.parse_args()
    model = DiTTransformer2DModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    classes = model.config.num_embeds_ada_norm
    labels = torch.arange(args.samples) % classes
    calib_labels = (torch.arange(8) * 7 + 3) % classes
    clock: dict = {}
    ref, ref_macs, ref_secs = run(model, labels, 0, clock)
    grid = methods(model, lambda: sample(model, calib_labels, STEPS, GUIDANCE, seed=123), clock)
    measured = []
    for (method, setting), (apply, remove) in grid.items():
        apply(model)
        try:
            out, macs, secs = run(model, labels, 0, clock)
        finally:
            remove(model)
        measured.append({"method": method, "setting": setting, "macs_saved": 1 - macs / ref_macs,
                         "psnr_db": psnr(out, ref), "cpu_speedup": ref_secs / secs})
        print(json.dumps(measured[-1]), flush=True)
    rows = []
    for target in args.targets:
        for method in dict.fromkeys(m["method"] for m in measured):
            best = min((m for m in measured if m["method"] == method), key=lambda m: abs(m["macs_saved"] - target))
            rows.append({"target_saving": target, **best})
    res = {"title": "ICC: PSNR to the uncached tiny DiT at matched MAC savings",
           "command": "python benchmarks/dit_cache.py", "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "sections": {"Matched savings": {"note": f"{args.samples} samples, DDIM {STEPS} steps, CFG {GUIDANCE}; uncached: "
                                            f"{ref_macs / 1e9:.1f} GMACs, {ref_secs:.1f} s. Per method and target, the "
                                            "grid setting closest to the target saving.", "rows": rows},
                        "All settings": {"note": "Every setting measured.", "rows": measured}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
