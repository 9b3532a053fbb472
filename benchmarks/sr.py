"""Super-resolution on held-out real photos: bicubic vs Real-ESRGAN (the baselines; TinySR rows come later).

    python benchmarks/sr.py --out benchmarks/results/sr.json

Photos: ``hf_ext.sr.data.sr_photos("eval")`` (natural scikit-image photos that no SR model here trains on),
centre-cropped to at most ``--crop`` pixels. Each is downscaled by 4 and by 2 (antialiased bicubic, 8-bit),
super-resolved, and scored against the original on the Y channel (BT.601), with ``scale`` pixels of border
left out: PSNR, and SSIM (torchmetrics). Real-ESRGAN runs through ``RealESRGANPipeline`` (tiled); its x2
is the x4 network then a bicubic resize, as the wheel's own x2 files and ``--outscale`` do. Latency: the
median per photo of the upscale call, models interleaved photo by photo, ``--threads`` CPU threads.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.sr import RealESRGANPipeline, load_upscaler  # noqa: E402
from hf_ext.sr.data import bicubic_degrade, load_rgb, sr_photos, y_channel  # noqa: E402


def scores(sr: torch.Tensor, hr: torch.Tensor, border: int) -> tuple[float, float]:
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    a, b = (y_channel(t.clamp(0, 1))[..., border:-border, border:-border].double() for t in (sr, hr))
    psnr = float(10 * torch.log10(1 / ((a - b) ** 2).mean()))
    return psnr, float(ssim(a, b, data_range=1.0))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crop", type=int, default=256, help="HR crop size (pixels)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/sr.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"bicubic": None}
    for name in ("realesr-animevideov3", "realesrgan-x4plus"):
        pipe = RealESRGANPipeline(upscaler=load_upscaler(name))
        pipe.set_progress_bar_config(disable=True)
        models[f"Real-ESRGAN {name}"] = pipe
    photos = sr_photos("eval")
    res = {(m, s): {"psnr": [], "ssim": [], "seconds": []} for m in models for s in (4, 2)}
    for path in photos:
        hr = load_rgb(path, args.crop)
        for s in (4, 2):
            lr = bicubic_degrade(hr, s)
            for m, pipe in models.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    sr = (F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False) if pipe is None
                          else pipe(lr, outscale=s, tile=128, output_type="pt").images)
                res[m, s]["seconds"].append(time.perf_counter() - t0)
                p, q = scores(sr, hr, s)
                res[m, s]["psnr"].append(p)
                res[m, s]["ssim"].append(q)
        print(path.stem, {f"{m} x{s}": round(r["psnr"][-1], 2) for (m, s), r in res.items()}, flush=True)
    rows = []
    for (m, s), r in res.items():
        pipe = models[m]
        rows.append({"model": m, "scale": s, "psnr_y": statistics.mean(r["psnr"]), "ssim_y": statistics.mean(r["ssim"]),
                     "params": 0 if pipe is None else sum(p.numel() for p in pipe.upscaler.parameters()),
                     "median_ms_per_photo": 1e3 * statistics.median(r["seconds"]),
                     "psnr_y_per_photo": dict(zip((p.stem for p in photos), (round(v, 2) for v in r["psnr"])))})
        print(json.dumps(rows[-1]), flush=True)
    out = {"title": "Super-resolution on held-out real photos (Y channel)", "command": "python benchmarks/sr.py",
           "machine": f"{platform.machine()}, {args.threads} threads",
           "sections": {"PSNR / SSIM": {
               "note": f"{len(photos)} held-out photos ({', '.join(p.stem for p in photos)}), centre crops of at most "
                       f"{args.crop} px; LR = antialiased bicubic downscale, 8-bit; means over photos; Y channel "
                       "(BT.601), `scale` px border excluded. Real-ESRGAN x2 = its x4 network + bicubic resize. "
                       "Real-ESRGAN is trained for real-world degradations, not this clean bicubic one.",
               "rows": rows}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
