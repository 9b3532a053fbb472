"""Real photos for SR training and evaluation, with a fixed train/eval split, and the eval degradation.

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
