"""Super-resolution on held-out real photos: bicubic, Real-ESRGAN, our one-step teacher and its TinySR student.

    python benchmarks/sr.py --out benchmarks/results/sr.json

Photos: ``hf_ext.sr.data.sr_photos("eval")`` (natural scikit-image photos that no SR model here trains on),
centre-cropped to at most ``--crop`` pixels. Each is degraded at x4 and x2 two ways: ``bicubic`` (antialiased
bicubic downscale, 8-bit) and ``realistic`` (``realistic_degrade``, the Real-ESRGAN-style blur/resize/noise/JPEG
the teacher trains on, seeded per photo and scale), super-resolved, and scored against the original on the Y
channel (BT.601) with ``scale`` pixels of border left out: PSNR, and SSIM (torchmetrics). No no-reference metric
(NIQE, MUSIQ, ...) can be had offline, so none is reported. Real-ESRGAN runs through ``RealESRGANPipeline``
(tiled); its x2 is the x4 network then a bicubic resize, as the wheel's own x2 files do. The teacher is
``tests/fixtures/sr_teacher`` (``benchmarks/train_sr_teacher.py``), the student ``tests/fixtures/sr_tinysr``
(``hf-ext convert tinysr``). Latency: the median per photo of the upscale call, all models interleaved photo by
photo, ``--threads`` CPU threads; MACs are counted as executed (``hf_ext.macs``) for one 64 px LR
image at x4. ``--parts memory`` measures the largest image the student upscales within 8 GB (peak RSS of a
child process); ``--png`` saves a side-by-side crop.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hf_ext.sr import OneStepSRPipeline, RealESRGANPipeline, load_upscaler  # noqa: E402
from hf_ext.sr.measure import pipeline_params  # noqa: E402
from hf_ext.sr.data import bicubic_degrade, load_rgb, psnr_ssim_y, realistic_degrade, sr_photos  # noqa: E402

TEACHER, STUDENT = ROOT / "tests/fixtures/sr_teacher", ROOT / "tests/fixtures/sr_tinysr"


def upscalers() -> dict:
    """name -> (fn(lr (1, 3, h, w) in [0, 1], scale) -> SR in [0, 1], parameter count, pipeline or None)."""
    out = {"bicubic": (lambda lr, s: F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False), 0, None)}
    for name in ("realesr-animevideov3", "realesrgan-x4plus"):
        pipe = RealESRGANPipeline(upscaler=load_upscaler(name))
        pipe.set_progress_bar_config(disable=True)
        out[f"Real-ESRGAN {name}"] = (lambda lr, s, p=pipe: p(lr, outscale=s, tile=128, output_type="pt").images,
                                      sum(p.numel() for p in pipe.upscaler.parameters()), pipe)
    for name, folder in (("teacher (ours)", TEACHER), ("TinySR student (ours)", STUDENT)):
        pipe = OneStepSRPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        out[name] = (lambda lr, s, p=pipe: p(lr, upscale=s, tile=64, output_type="pt").images, pipeline_params(pipe),
                     pipe)
    return out


def quality(models: dict, crop: int) -> tuple[list[dict], dict]:
    photos = sr_photos("eval")
    keys = [(m, s, d) for d in ("bicubic", "realistic") for s in (4, 2) for m in models]
    res = {k: {"psnr": [], "ssim": [], "seconds": []} for k in keys}
    for path in photos:
        hr = load_rgb(path, crop)
        for d in ("bicubic", "realistic"):
            for s in (4, 2):
                g = torch.Generator().manual_seed(zlib.crc32(f"{path.stem}/{s}".encode()))
                lr = bicubic_degrade(hr, s) if d == "bicubic" else realistic_degrade(hr, s, g)
                for m, (fn, _, _) in models.items():
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        sr = fn(lr, s)
                    res[m, s, d]["seconds"].append(time.perf_counter() - t0)
                    p, q = psnr_ssim_y(sr, hr, s)
                    res[m, s, d]["psnr"].append(p)
                    res[m, s, d]["ssim"].append(q)
        print(path.stem, {f"{m} x{s} {d}": round(r["psnr"][-1], 2) for (m, s, d), r in res.items()}, flush=True)
    rows = [{"model": m, "degradation": d, "scale": s, "psnr_y": statistics.mean(r["psnr"]),
             "ssim_y": statistics.mean(r["ssim"]), "median_ms_per_photo": 1e3 * statistics.median(r["seconds"]),
             "psnr_y_per_photo": dict(zip((p.stem for p in photos), (round(v, 2) for v in r["psnr"])))}
            for (m, s, d), r in res.items()]
    return rows, {k: r for k, r in res.items()}


def compression(models: dict, res: dict) -> list[dict]:
    from hf_ext.sr.measure import pipeline_macs

    rows = []
    for m in ("teacher (ours)", "TinySR student (ours)"):
        fn, params, pipe = models[m]
        macs = pipeline_macs(pipe)
        with torch.no_grad():                                    # the VAE alone: the ceiling of the pipeline
            recon = [psnr_ssim_y((pipe.decode(pipe.encode(hr * 2 - 1)) + 1) / 2, hr, 4)[0]
                     for hr in (load_rgb(p, 256) for p in sr_photos("eval"))]
        r = res[m, 4, "bicubic"]
        rows.append({"model": m, "params": params, "gmacs_x4_64px": macs.total / 1e9,
                     "gmacs_conv": macs.by_op["conv"] / 1e9, "gmacs_attention": macs.by_op["attention"] / 1e9,
                     "gmacs_linear": (macs.by_op["linear"] + macs.by_op["matmul"]) / 1e9,
                     "vae_reconstruction_psnr_y": statistics.mean(recon),
                     "median_ms_per_photo_x4": 1e3 * statistics.median(r["seconds"]),
                     "psnr_y_x4_bicubic": statistics.mean(r["psnr"]),
                     "psnr_y_x4_realistic": statistics.mean(res[m, 4, "realistic"]["psnr"])})
    t, s = rows
    rows.append({"model": "student / teacher", "params": s["params"] / t["params"],
                 "gmacs_x4_64px": s["gmacs_x4_64px"] / t["gmacs_x4_64px"],
                 "median_ms_per_photo_x4": s["median_ms_per_photo_x4"] / t["median_ms_per_photo_x4"],
                 "psnr_y_x4_bicubic": s["psnr_y_x4_bicubic"] - t["psnr_y_x4_bicubic"],
                 "psnr_y_x4_realistic": s["psnr_y_x4_realistic"] - t["psnr_y_x4_realistic"]})
    return rows


CHILD = """
import resource, sys, time, torch
sys.path.insert(0, {root!r})
from hf_ext.sr import OneStepSRPipeline
torch.set_num_threads({threads})
pipe = OneStepSRPipeline.from_pretrained({folder!r}); pipe.set_progress_bar_config(disable=True)
lr = torch.rand(1, 3, {side}, {side}, generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter(); out = pipe(lr, upscale=4, tile=64, output_type="pt").images
print(out.shape[-1], time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def memory(threads: int, sides=(256, 512, 1024, 2048)) -> list[dict]:
    rows = []
    for side in sides:
        code = CHILD.format(root=str(ROOT), threads=threads, folder=str(STUDENT), side=side)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode:
            rows.append({"lr_side": side, "error": r.stderr.strip().splitlines()[-1]})
            break
        out_side, seconds, rss = r.stdout.split()
        rows.append({"lr_side": side, "sr_side": int(out_side), "seconds": float(seconds), "peak_rss_gb": int(rss) / 2**30})
        print(json.dumps(rows[-1]), flush=True)
        if int(rss) > 8 * 2**30:
            break
    return rows


def side_by_side(models: dict, path: Path, crop: int = 96) -> None:
    from PIL import Image

    photo = sr_photos("eval")[2]                                        # motorcycle_right: detail everywhere
    hr = load_rgb(photo, 4 * crop)
    lr = bicubic_degrade(hr, 4)
    tiles = [F.interpolate(lr, scale_factor=4, mode="nearest")]
    for m in ("bicubic", "Real-ESRGAN realesrgan-x4plus", "teacher (ours)", "TinySR student (ours)"):
        with torch.no_grad():
            tiles.append(models[m][0](lr, 4).clamp(0, 1))
    tiles.append(hr)
    row = torch.cat(tiles, dim=-1)[0]
    Image.fromarray((row.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crop", type=int, default=256, help="HR crop size (pixels)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--parts", default="quality,memory", help="comma list of: quality, memory")
    ap.add_argument("--png", default="benchmarks/results/sr_side_by_side.png")
    ap.add_argument("--out", default="benchmarks/results/sr.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    out.update({"title": "Super-resolution on held-out real photos (Y channel)", "command": "python benchmarks/sr.py",
                "machine": f"{platform.machine()}, {args.threads} threads"})
    sections = out.setdefault("sections", {})
    parts = set(args.parts.split(","))
    if "quality" in parts:
        models = upscalers()
        rows, res = quality(models, args.crop)
        photos = ", ".join(p.stem for p in sr_photos("eval"))
        sections["PSNR / SSIM"] = {
            "note": f"4 held-out photos ({photos}), centre crops of at most {args.crop} px; means over photos; Y "
                    "channel (BT.601), `scale` px border excluded. bicubic LR = antialiased bicubic downscale; "
                    "realistic LR = hf_ext.sr.data.realistic_degrade (seeded). Real-ESRGAN x2 = its x4 network + "
                    "bicubic resize. Two nearly flat crops (cell, retina) dominate the bicubic means; see the "
                    "per-photo values.", "rows": rows}
        sections["TinySR: teacher vs student"] = {
            "note": "params = VAE + transformer; GMACs executed for one 64 px LR image at x4 (256 px out); latency "
                    "= median per photo from the interleaved run above; last row = student / teacher ratios "
                    "(PSNR: student - teacher, dB).", "rows": compression(models, res)}
        side_by_side(models, Path(args.png))
    if "memory" in parts:
        sections["Largest image within 8 GB"] = {
            "note": "TinySR student, x4, tile 64 LR px, random LR image of side lr_side; peak RSS of a fresh "
                    "child process (weights, tiles, the full-size output and colour-fix buffers).",
            "rows": memory(args.threads)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
