"""SR math for the one-step pipeline: AdaIN and wavelet colour fixes (as in StableSR / TSD-SR).

A one-step SR model can shift colours. Both fixes take the colours from a reference, the bicubic
upsampled LR image, and the detail from the SR output:
- ``adain_color_fix``: per-channel mean and std of the output matched to the reference's.
- ``wavelet_color_fix``: an a-trous wavelet split (a 3x3 binomial blur at dilations 1, 2, 4, ...) into
  high and low frequencies; the output's high frequencies plus the reference's low frequencies. The
  split telescopes (high + low = x exactly), so a reference equal to the output returns it unchanged.
``*_naive`` are loop-per-level references of the same math, for the tests.

Example:
    >>> ref = torch.rand(1, 3, 32, 32)
    >>> torch.allclose(wavelet_color_fix(ref + 0.2, ref), ref, atol=1e-5)    # a colour cast removed
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


def adain_color_fix(content: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, C, H, W): ``content`` with the per-channel mean and std of ``reference`` (any size)."""
    mc, sc = content.mean((2, 3), keepdim=True), content.std((2, 3), keepdim=True)
    mr, sr = reference.mean((2, 3), keepdim=True), reference.std((2, 3), keepdim=True)
    return (content - mc) / (sc + eps) * sr + mr


def wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) of (B, C, H, W): low is x blurred at dilations 1..2^(levels-1); high = x - low."""
    C = x.shape[1]
    kernel = _BLUR.to(x)[None, None].repeat(C, 1, 1, 1)                          # (C, 1, 3, 3), depthwise
    low = x
    for i in range(levels):
        d = 2 ** i
        low = F.conv2d(F.pad(low, (d, d, d, d), mode="replicate"), kernel, dilation=d, groups=C)
    return x - low, low


def wavelet_color_fix(content: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """``content``'s high frequencies + ``reference``'s low frequencies (same size)."""
    if content.shape != reference.shape:
        raise ValueError(f"wavelet colour fix needs equal sizes; got {tuple(content.shape)} and "
                         f"{tuple(reference.shape)} (upsample the reference first)")
    return wavelet_split(content, levels)[0] + wavelet_split(reference, levels)[1]


def wavelet_split_naive(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the same blur written as a sum over the 9 taps, pixel offsets clamped at the border."""
    B, C, H, W = x.shape
    low = x
    for i in range(levels):
        d = 2 ** i
        out = torch.zeros_like(low)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                rows = (torch.arange(H) + dy * d).clamp(0, H - 1)
                cols = (torch.arange(W) + dx * d).clamp(0, W - 1)
                out += float(_BLUR[dy + 1, dx + 1]) * low[:, :, rows][:, :, :, cols]
        low = out
    return x - low, low
