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


# ------------------------------------------------------------------ TSD-SR's latent tiling (tsdsr.py)
def tsdsr_tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """TSD-SR's tile offsets along one latent axis of length ``n`` (test_tsdsr.py ``tile_sample``): steps of
    ``tile - overlap``, counted until a tile reaches the end, the last one snapped to ``n - tile``."""
    count, reach = 0, 0
    while reach < n:
        reach = max(count * (tile - overlap), 0) + tile
        count += 1
    return [i * (tile - overlap) for i in range(count - 1)] + [n - tile]


def tsdsr_tile_weights(tile: int, var: float = 0.01) -> torch.Tensor:
    """(tile, tile) Gaussian blending weights of TSD-SR, in coordinates normalised by the tile: σ = √var · tile.
    As in the original, the width's centre is (tile - 1) / 2 and the height's tile / 2."""
    def gauss(mid: float) -> torch.Tensor:
        x = torch.arange(tile, dtype=torch.float64)
        return torch.exp(-((x - mid) / tile) ** 2 / (2 * var)) / (2 * torch.pi * var) ** 0.5
    return torch.outer(gauss(tile / 2), gauss((tile - 1) / 2))                      # (rows, cols)


def tsdsr_tiled(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int = 64,
                overlap: int = 8) -> torch.Tensor:
    """``fn`` (B, C, h, w) -> same shape, applied on overlapping square latent tiles and blended with
    ``tsdsr_tile_weights`` (float32 sums); a latent of area <= tile² runs whole, as in TSD-SR."""
    h, w = z.shape[-2:]
    if h * w <= tile * tile:
        return fn(z)
    t = min(tile, h, w)
    weight = tsdsr_tile_weights(t).to(z.device, torch.float32)                          # (t, t)
    out = torch.zeros(z.shape, device=z.device, dtype=torch.float32)
    total = torch.zeros(z.shape[-2:], device=z.device, dtype=torch.float32)
    for y in tsdsr_tile_starts(h, t, overlap):
        for x in tsdsr_tile_starts(w, t, overlap):
            out[..., y:y + t, x:x + t] += fn(z[..., y:y + t, x:x + t]).float() * weight
            total[y:y + t, x:x + t] += weight
    return (out / total).to(z.dtype)
