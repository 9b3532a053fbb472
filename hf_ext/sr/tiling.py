"""Tiled super-resolution: run an upscaler on overlapping tiles and blend them, so any image size fits.

Each tile's output is weighted by a separable linear ramp over the overlap on every side that meets
another tile (weight 1 elsewhere and at the image border); the blend divides by the summed weights. A
function that maps a constant image to a constant therefore gives the same constant across every tile
border (tested), and convolution edge effects at tile borders fade out instead of leaving seams. Peak
memory is one tile's activations plus the output.

Example:
    >>> import torch, torch.nn.functional as F
    >>> up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")
    >>> x = torch.rand(1, 3, 100, 70)
    >>> torch.allclose(tiled_upscale(up, x, scale=2, tile=32, overlap=8, progress=False), up(x))
    True
"""
from __future__ import annotations

from typing import Callable

import torch


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering [0, n), neighbours overlapping by >= ``overlap``."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _ramp(n: int, ramp: int, up: bool, down: bool) -> torch.Tensor:
    w = torch.ones(n)
    r = (torch.arange(ramp) + 0.5) / ramp                                       # (ramp,) in (0, 1)
    if up:
        w[:ramp] = r
    if down:
        w[n - ramp:] = torch.minimum(w[n - ramp:], r.flip(0))
    return w


@torch.no_grad()
def tiled_upscale(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, tile: int = 256,
                  overlap: int = 16, progress: bool = True) -> torch.Tensor:
    """``fn`` (B, C, h, w) -> (B, C', scale*h, scale*w) applied to (B, C, H, W) tile by tile, blended."""
    from tqdm.auto import tqdm

    if tile < 1 or not 0 <= overlap < tile / 2:
        raise ValueError(f"tile={tile}, overlap={overlap}: give tile >= 1 and 0 <= overlap < tile / 2")
    B, _, H, W = x.shape
    if H <= tile and W <= tile:
        return fn(x)
    rows, cols = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
    out = weight = None
    s, ramp = scale, max(scale * overlap, 1)
    for top, left in tqdm([(t, l) for t in rows for l in cols], desc="SR tiles", disable=not progress):
        th, tw = min(tile, H - top), min(tile, W - left)
        y = fn(x[..., top:top + th, left:left + tw])                            # (B, C', s*th, s*tw)
        if out is None:
            out = y.new_zeros(B, y.shape[1], s * H, s * W)
            weight = y.new_zeros(1, 1, s * H, s * W)
        wy = _ramp(s * th, ramp, top > 0, top + th < H).to(y)
        wx = _ramp(s * tw, ramp, left > 0, left + tw < W).to(y)
        w = wy[:, None] * wx[None, :]                                           # (s*th, s*tw)
        out[..., s * top:s * (top + th), s * left:s * (left + tw)] += y * w
        weight[..., s * top:s * (top + th), s * left:s * (left + tw)] += w
    return out / weight


def progress_enabled(pipe) -> bool:
    """Whether a diffusers pipeline's progress bars are on (``set_progress_bar_config(disable=...)``)."""
    return not getattr(pipe, "_progress_bar_config", {}).get("disable", False)


def open_images(image):
    """Pipeline input: a path (str or Path) or a list of them becomes PIL RGB images; anything else is returned
    as is. An empty or unreadable file is refused with its name."""
    from pathlib import Path

    if isinstance(image, (list, tuple)):
        return [open_images(i) for i in image]
    if not isinstance(image, (str, Path)):
        return image
    from PIL import Image, UnidentifiedImageError

    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): give a PNG, JPEG or other image file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e}); give a PNG, JPEG or other image file") from None
