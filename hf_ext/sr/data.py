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


def random_crops(photos: list[torch.Tensor], n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) random crops in [0, 1] of (1, 3, H, W) ``photos``, at a random zoom in [0.5, 1] (antialiased
    downscale first), with random flips and 90-degree turns: the SR training augmentation."""
    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    out = []
    for _ in range(n):
        p = photos[int(torch.randint(len(photos), (), generator=generator))]
        z = max(u(0.5, 1.0), size / min(p.shape[-2:]))
        if z < 1:
            p = F.interpolate(p, scale_factor=z, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        i = int(torch.randint(p.shape[-2] - size + 1, (), generator=generator))
        j = int(torch.randint(p.shape[-1] - size + 1, (), generator=generator))
        c = p[0, :, i:i + size, j:j + size]
        if u(0, 1) < 0.5:
            c = c.flip(-1)
        out.append(torch.rot90(c, int(torch.randint(4, (), generator=generator)), (-2, -1)))
    return torch.stack(out)


DEGRADATIONS = ("realistic", "bicubic", "mixed")


def sr_batches(split: str, size: int, batch: int, scales: tuple[int, ...], seed: int = 0, degrade: str = "realistic"):
    """Endless (lr_up, hr, scale) batches for training: HR crops (B, 3, size, size) of ``split``'s photos, their LR
    made by ``realistic_degrade`` (or ``bicubic_degrade``; ``"mixed"`` draws one of the two per batch) at a random
    scale from ``scales`` and bicubic-upsampled back to ``size``; both in [-1, 1], as the pipelines take them."""
    if degrade not in DEGRADATIONS:
        raise ValueError(f"degrade={degrade!r}: use one of {DEGRADATIONS}")
    if any(size % s for s in scales):
        raise ValueError(f"crop size {size} is not a multiple of every scale in {scales}")
    g = torch.Generator().manual_seed(seed)
    photos = [load_rgb(p) for p in sr_photos(split)]
    while True:
        hr = random_crops(photos, batch, size, g)
        s = scales[int(torch.randint(len(scales), (), generator=g))]
        d = degrade if degrade != "mixed" else DEGRADATIONS[int(torch.randint(2, (), generator=g))]
        lr = realistic_degrade(hr, s, g) if d == "realistic" else bicubic_degrade(hr, s)
        up = F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False).clamp(0, 1)
        yield up * 2 - 1, hr * 2 - 1, s


def psnr_ssim_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> tuple[float, float]:
    """PSNR (dB) and SSIM of (1, 3, H, W) images in [0, 1] on the Y channel, ``border`` pixels left out (the SR
    convention; SSIM from torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    b = max(border, 0)
    crop = (..., slice(b, sr.shape[-2] - b), slice(b, sr.shape[-1] - b))
    x, y = (y_channel(t.clamp(0, 1))[crop].double() for t in (sr, hr))
    return float(10 * torch.log10(1 / ((x - y) ** 2).mean())), float(ssim(x, y, data_range=1.0))


@torch.no_grad()
def eval_psnr(pipe, scale: int, crop: int = 256, **call) -> float:
    """Mean Y-PSNR of ``pipe`` (any of the SR pipelines, output_type "pt") over the eval photos, LR made by
    ``bicubic_degrade``; ``call`` goes to the pipeline call."""
    vals = []
    for path in sr_photos("eval"):
        hr = load_rgb(path, crop)
        sr = pipe(bicubic_degrade(hr, scale), output_type="pt", **call).images
        vals.append(psnr_ssim_y(sr, hr, scale)[0])
    return sum(vals) / len(vals)
