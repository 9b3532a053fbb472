"""Real photos for SR training and evaluation, with a fixed train/eval split; the clean eval degradation
(``bicubic_degrade``) and the Real-ESRGAN-style training degradation (``realistic_degrade``).

The photos are the natural images that ship in scikit-image's wheel (``hf_ext.zoo.real_images``); synthetic
ones (charts, logos, text, phantoms) are left out. A stable hash of the name puts about a quarter in
``eval`` (never trained on); the rest are ``train``.

Example:
    >>> [p.stem for p in sr_photos("eval")]                     # doctest: +SKIP
    ['cell', 'grass', 'motorcycle_right', 'retina']
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "moon", "motorcycle_left", "motorcycle_right", "retina", "rocket")


def sr_photos(split: str) -> list[Path]:
    """The natural photos of ``split`` ("train" or "eval"), sorted by name."""
    from ..zoo import real_images

    if split not in ("train", "eval"):
        raise ValueError(f"split '{split}': use 'train' or 'eval'")
    want_eval = split == "eval"
    return [p for p in real_images() if p.stem in PHOTOS
            and (int(hashlib.md5(p.stem.encode()).hexdigest(), 16) % 4 == 0) == want_eval]


def load_rgb(path: str | Path, crop: int | None = None, multiple: int = 4) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]; grey photos are replicated to RGB; centre-cropped to at most ``crop`` and to a
    multiple of ``multiple`` on each side."""
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    H, W = a.shape[:2]
    h, w = min(H, crop or H), min(W, crop or W)
    h, w = h - h % multiple, w - w % multiple
    top, left = (H - h) // 2, (W - w) // 2
    return torch.from_numpy(a[top:top + h, left:left + w].copy()).permute(2, 0, 1)[None]


def bicubic_degrade(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The clean eval degradation: antialiased bicubic downscale by ``scale``, rounded to 8 bits."""
    lr = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return (lr.clamp(0, 1) * 255).round() / 255


def y_channel(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) ITU-R BT.601 luma in [16/255, 235/255] (the SR convention)."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 255
    return (x * w).sum(1, keepdim=True) + 16 / 255


def _gaussian_kernel(size: int, sx: float, sy: float, theta: float) -> torch.Tensor:
    """(size, size) anisotropic Gaussian blur kernel, summing to 1."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * x + s * y, -s * x + c * y
    k = torch.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return (k / k.sum()).float()


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    from PIL import Image

    out = []
    for img in x:                                                               # (3, H, W) each
        buf = io.BytesIO()
        arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255
        out.append(torch.from_numpy(dec.copy()).permute(2, 0, 1))
    return torch.stack(out)


def realistic_degrade(hr: torch.Tensor, scale: int, generator: torch.Generator, orders: int = 2,
                      noise: bool = True) -> torch.Tensor:
    """Real-ESRGAN-style training degradation of (B, 3, H, W) in [0, 1] to (B, 3, H/scale, W/scale):
    ``orders`` rounds of (random anisotropic Gaussian blur, random resize, Gaussian noise, JPEG), then a
    resize to the LR size and 8-bit rounding. Reproducible from ``generator``."""
    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    H, W = hr.shape[-2:]
    x = hr
    for _ in range(orders):
        k = _gaussian_kernel(7 if u(0, 1) < 0.5 else 11, u(0.2, 2.0), u(0.2, 2.0), u(0, np.pi)).to(x)
        x = F.conv2d(F.pad(x, [k.shape[0] // 2] * 4, mode="reflect"), k[None, None].repeat(3, 1, 1, 1), groups=3)
        size = (max(8, round(x.shape[-2] * u(0.5, 1.2))), max(8, round(x.shape[-1] * u(0.5, 1.2))))
        x = F.interpolate(x, size=size, mode=("bilinear", "bicubic", "area")[int(u(0, 3))])
        if noise:
            x = x + torch.randn(x.shape, generator=generator) * u(0.0, 0.1)
        x = _jpeg(x, u(30, 95))
    lr = F.interpolate(x, size=(H // scale, W // scale), mode="bicubic", align_corners=False)
    return (lr.clamp(0, 1) * 255).round() / 255
