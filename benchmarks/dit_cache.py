"""ICC vs other DiT caches on trained tiny diffusion transformers, at matched measured MAC savings, side by side.

    python benchmarks/dit_cache.py --out benchmarks/results/dit_cache.json
    python benchmarks/dit_cache.py --model tests/fixtures/tiny_pixart --out benchmarks/results/dit_cache_pixart.json

Models (``benchmarks/train_tiny_dit.py``, trained on 16x16 crops of real photos, 26 classes): the
class-conditional DiT (tests/fixtures/tiny_dit) and PixArt (tests/fixtures/tiny_pixart, the class as a
one-hot caption). Sampling: DDIM 35 steps, classifier-free guidance 1.5 (cond and uncond in one batch); every
method starts from the same noise; the reference is the uncached model. MACs are counted as executed
(``hf_ext.macs``) over the whole run. PSNR (on [0, 1] pixels, mean over samples) and SSIM
(torchmetrics) are against the uncached samples.

Settings are chosen on a dev run, never on the evaluation samples: every setting of every method's grid runs
on ``--dev-samples`` dev samples (seed 1000, other labels); per target saving, the two settings of the
method's dev Pareto front (saving vs PSNR) that bracket it are then run on the ``--samples`` evaluation
samples (seed 0), and the PSNR is interpolated between them at the target, by their measured savings.
Calibration (CA-SVD, CD-SVD, RRR) uses a third run (16 samples, seed 123, other labels); RRR's ridge is one more
setting of its grid, chosen on dev like the rest (``hf_ext.dit_cache.select_ridge``'s rule). Wall clock: benchmarks/dit_cache_speed.py.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from train_tiny_dit import num_classes, sample  # noqa: E402

from hf_ext.dit_cache import ICCConfig, apply_icc_cache, remove_icc_cache  # noqa: E402
from hf_ext.macs import count_macs  # noqa: E402

STEPS, GUIDANCE = 35, 1.5
RANKS = (4, 8, 16, 32)  # width 128: a rank-r correction costs r/64 of a 128x128 layer (the paper's r=128 at width 1152: 22%)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (((a - b) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-12)       # [-1, 1] -> [0, 1] pixels
    return float((10 * torch.log10(1 / mse)).mean())


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM on [0, 1] pixels (torchmetrics; a 7-px Gaussian window, as the images are 16 px)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn

    return float(ssim_fn((a + 1) / 2, (b + 1) / 2, data_range=1.0, kernel_size=7, sigma=1.0))


def frontier(points: list[dict]) -> list[dict]:
    """The settings no other setting beats on both MAC saving and PSNR, by increasing saving."""
    front, best = [], -float("inf")
    for p in sorted(points, key=lambda p: (-p["macs_saved"], -p["psnr_db"])):
        if p["psnr_db"] > best:
            front.append(p)
            best = p["psnr_db"]
    return front[::-1]


def bracket(points: list[dict], target: float, tol: float = 0.005) -> list[dict]:
    """The settings of the Pareto front at ``target`` saving: one within ``tol``, else the two around it."""
    front = frontier(points)
    near = [p for p in front if abs(p["macs_saved"] - target) <= tol]
    if near:
        return near[:1]
    return next(([lo, hi] for lo, hi in zip(front, front[1:]) if lo["macs_saved"] < target < hi["macs_saved"]), [])


def interpolate(evals: list[dict], target: float) -> dict:
    """PSNR/SSIM at ``target``, linear in the measured savings of one or two evaluated settings."""
    if not evals:
        return {"psnr_db": None, "ssim": None, "settings": "grid does not reach this saving"}
    if len(evals) == 1:
        return {"psnr_db": evals[0]["psnr_db"], "ssim": evals[0]["ssim"], "settings": evals[0]["setting"]}
    lo, hi = sorted(evals, key=lambda e: e["macs_saved"])
    w = (target - lo["macs_saved"]) / (hi["macs_saved"] - lo["macs_saved"])
    return {"psnr_db": lo["psnr_db"] + w * (hi["psnr_db"] - lo["psnr_db"]),
            "ssim": lo["ssim"] + w * (hi["ssim"] - lo["ssim"]),
            "settings": f"{lo['setting']} ({lo['macs_saved']:.1%}) .. {hi['setting']} ({hi['macs_saved']:.1%})"}


def run(model, labels, seed, clock: dict, steps: int = STEPS, count: bool = True):
    """One sampling run from fresh cache state: (samples, MACs executed, seconds). ``clock["t"]``: the timestep.
    ``count=False`` runs without the MAC counter (its per-op dispatch would weigh on the timing); MACs are 0."""
    import contextlib

    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    reg = HookRegistry.check_if_exists_or_initialize(model)
    reg._child_registries_cache = None  # hooks were added to blocks since the last run
    reg.reset_stateful_hooks(recurse=True)
    _set_cache_context(model, CacheContext("cfg"))  # DiT is not a CacheMixin: one context for the batched CFG call
    with count_macs() if count else contextlib.nullcontext() as macs:
        t0 = time.perf_counter()
        out = sample(model, labels, steps, GUIDANCE, seed, on_step=lambda i, t: clock.__setitem__("t", int(t)))
        secs = time.perf_counter() - t0
    _set_cache_context(model, None)
    return out, macs.total if count else 0, secs


# diffusers TaylorSeer's default patterns (re.fullmatch "^transformer_blocks.*attn") miss DiT's attn1 and ff
TAYLORSEER_TARGETS = [r"transformer_blocks\.\d+\.(attn\d|ff)"]


def strip(m) -> None:
    """Remove every diffusers hook (TaylorSeer, FirstBlockCache, PAB) from ``m`` and its submodules."""
    from diffusers.hooks.hooks import HookRegistry

    reg = HookRegistry.check_if_exists_or_initialize(m)
    for name in list(reg.hooks):
        reg.remove_hook(name, recurse=True)
    for sub in m.modules():
        r = getattr(sub, "_diffusers_hook", None)
        if r is not None:
            for name in list(r.hooks):
                r.remove_hook(name, recurse=False)


def methods(model, calib_run, clock: dict):
    """(method, setting) -> (apply(model) -> None, remove(model) -> None) for each setting of each method's grid."""
    from diffusers.hooks import (FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig,
                                 apply_first_block_cache, apply_pyramid_attention_broadcast, apply_taylorseer_cache)
    from hf_ext.dit_cache import channel_stats, compute_factors, residual_stats
    from hf_ext.dit_cache.calibration import RIDGES

    def icc(cfg, f):
        return (lambda m: apply_icc_cache(m, cfg, f)), remove_icc_cache

    out = {}
    stats = {"svd": None, "ca-svd": channel_stats(model, ICCConfig(rank=1), calib_run),
             "cd-svd": channel_stats(model, ICCConfig(rank=1), calib_run, increments=True)}
    for n in (2, 3, 4, 5):
        out[("reuse", f"N={n}")] = icc(ICCConfig(rank=1, method="reuse", full_every=n), {})
        for r in RANKS:
            for method in ("svd", "ca-svd", "cd-svd"):
                cfg = ICCConfig(rank=r, method=method, full_every=n)
                out[(f"ICC {method.upper()}", f"N={n} r={r}")] = icc(cfg, compute_factors(model, cfg, stats[method]))
    for th in (0.1, 0.2, 0.3):     # the adaptive schedule: recompute when the first layer's input moved > th
        out[("reuse", f"threshold={th}")] = icc(ICCConfig(rank=1, method="reuse", threshold=th), {})
    # forecast and correct, per linear layer: CA-SVD factors, inputs and outputs forecast to first order
    for n, warm in ((2, 0), (3, 0), (4, 0), (2, 4), (3, 4), (4, 4)):
        for r in (8, 16, 32):
            cfg = ICCConfig(rank=r, method="ca-svd", full_every=n, warmup=warm, forecast=1)
            out[("ICC CA-SVD + forecast", f"N={n} warmup={warm} r={r}")] = icc(cfg, compute_factors(model, cfg, stats["ca-svd"]))
    # forecast and correct, per module: attention and MLP modules skipped, RRR-corrected (fitted per schedule)
    for order in (1, 2):
        for n, warm in ((2, 2), (2, 4), (2, 8), (3, 2), (3, 4), (4, 4)):
            base = ICCConfig(rank=max(RANKS), method="rrr", granularity="module", full_every=n, warmup=warm,
                             forecast=order)
            res = residual_stats(model, base, calib_run)
            for r, ridge in itertools.product((4, 8, 16), RIDGES):    # the ridge is chosen on dev, as select_ridge does
                cfg = ICCConfig(**{**base.__dict__, "rank": r, "ridge": ridge})
                out[("ICC RRR modules + forecast", f"order={order} N={n} warmup={warm} r={r} ridge={ridge:g}")] = icc(
                    cfg, compute_factors(model, cfg, res))
    for th in (0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.2, 0.4):
        out[("FirstBlockCache", f"threshold={th}")] = (
            lambda m, th=th: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=th)), strip)
    for order in (1, 2):
        for n, warm in ((2, 16), (2, 8), (2, 4), (2, 2), (3, 4), (3, 2), (4, 2), (6, 2)):
            out[("TaylorSeer", f"order={order} interval={n} warmup={warm}")] = (
                lambda m, n=n, warm=warm, order=order: apply_taylorseer_cache(m, TaylorSeerCacheConfig(
                    cache_interval=n, disable_cache_before_step=warm, max_order=order,
                    taylor_factors_dtype=torch.float32, cache_identifiers=TAYLORSEER_TARGETS)), strip)
    for n in (2, 3, 4, 6):
        out[("PyramidAttentionBroadcast", f"skip={n}")] = (
            lambda m, n=n: apply_pyramid_attention_broadcast(m, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(0, 1000),
                current_timestep_callback=lambda: clock.get("t", 999))), strip)
    return out


def load(folder: str):
    """The saved diffusers transformer in ``folder`` (DiT or PixArt), float32, eval mode."""
    import diffusers

    name = json.loads((Path(folder) / "config.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(folder, torch_dtype=torch.float32).eval()


def measure(model, grid, keys, labels, seed, ref, ref_macs, clock, log=None) -> list[dict]:
    rows = []
    for key in keys:
        apply, remove = grid[key]
        apply(model)
        try:
            out, macs, _ = run(model, labels, seed, clock)
        finally:
            remove(model)
        rows.append({"method": key[0], "setting": key[1], "macs_saved": 1 - macs / ref_macs,
                     "psnr_db": psnr(out, ref), "ssim": ssim(out, ref)})
        if log:
            print(log, json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE.parent / "tests/fixtures/tiny_dit"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--dev-samples", type=int, default=16)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.30, 0.45, 0.60])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/dit_cache.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    classes = num_classes(model)
    labels, dev_labels = torch.arange(args.samples) % classes, (torch.arange(args.dev_samples) * 5 + 2) % classes
    calib_labels = (torch.arange(16) * 7 + 3) % classes
    clock: dict = {}
    ref, ref_macs, _ = run(model, labels, 0, clock)
    dev_ref, dev_macs, _ = run(model, dev_labels, 1000, clock)
    grid = methods(model, lambda: sample(model, calib_labels, STEPS, GUIDANCE, seed=123), clock)
    dev = measure(model, grid, list(grid), dev_labels, 1000, dev_ref, dev_macs, clock, log="dev")
    chosen = {}                                      # (method, target) -> the dev settings that bracket it
    for target in args.targets:
        for method in dict.fromkeys(m["method"] for m in dev):
            chosen[method, target] = [(method, p["setting"]) for p in bracket([m for m in dev if m["method"] == method], target)]
    keys = list(dict.fromkeys(k for ks in chosen.values() for k in ks))
    evals = {(e["method"], e["setting"]): e for e in measure(model, grid, keys, labels, 0, ref, ref_macs, clock, log="eval")}
    rows = [{"target_saving": target, "method": method, **interpolate([evals[k] for k in ks], target)}
            for (method, target), ks in chosen.items()]
    res = {"title": f"ICC: PSNR to the uncached tiny {type(model).__name__} at matched MAC savings",
           "command": "python benchmarks/dit_cache.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "sections": {"Matched savings": {"note": f"{args.samples} evaluation samples (seed 0), DDIM {STEPS} steps, CFG "
                                            f"{GUIDANCE}; uncached: {ref_macs / 1e9:.1f} GMACs. Per method and target, the "
                                            "settings bracketing it on the dev Pareto front, run on the evaluation "
                                            "samples and interpolated at the target; null where the grid does not "
                                            "reach it.", "rows": rows},
                        "Evaluated settings": {"note": "The chosen settings on the evaluation samples.",
                                               "rows": list(evals.values())},
                        "Dev grid": {"note": f"Every setting on {args.dev_samples} dev samples (seed 1000).", "rows": dev}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
