"""TinySR's compression math: the depthwise-separable factorization of a dense convolution (SepConv).

TinySR (https://arxiv.org/abs/2508.17434) replaces the VAE's k x k convs by a depthwise k x k conv then a
pointwise 1 x 1 mix; ``sepconv_factors`` gives the closest such pair to a trained dense weight (used by
``vae_compression.sepconv_from_conv``). ``sepconv_weight_naive`` is a loop reference, for the tests.

Example:
    >>> w = torch.randn(4, 3, 1, 1) * torch.randn(1, 3, 3, 3)                 # rank 1 per input channel
    >>> d, p = sepconv_factors(w.double())
    >>> torch.allclose(sepconv_weight_naive(d, p), w.double())
    True
"""
from __future__ import annotations

import torch


def sepconv_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best depthwise-then-pointwise factorization of a dense conv weight (out, in, k, k).

    SepConv computes W'[o, i] = P[o, i] * D[i] (a k x k depthwise filter D[i] per input channel, then a
    1 x 1 mix P): each input channel's slice W[:, i] (out, k*k) is approximated by a rank-1 matrix, whose
    best choice in Frobenius norm is its top singular pair. Returns (depthwise (in, 1, k, k), pointwise
    (out, in, 1, 1)); exact when every slice has rank 1.
    """
    out, cin, kh, kw = weight.shape
    u, s, vh = torch.linalg.svd(weight.permute(1, 0, 2, 3).reshape(cin, out, kh * kw).double(), full_matrices=False)
    depthwise = (vh[:, 0] * s[:, :1].sqrt()).reshape(cin, 1, kh, kw)                       # (in, 1, k, k)
    pointwise = (u[:, :, 0] * s[:, :1].sqrt()).T.reshape(out, cin, 1, 1)                    # (out, in, 1, 1)
    return depthwise.to(weight.dtype), pointwise.to(weight.dtype)


def sepconv_weight_naive(depthwise: torch.Tensor, pointwise: torch.Tensor) -> torch.Tensor:
    """Reference: the dense weight (out, in, k, k) that a depthwise-then-pointwise pair computes, by loops."""
    out, cin = pointwise.shape[:2]
    w = torch.zeros(out, cin, *depthwise.shape[-2:], dtype=depthwise.dtype)
    for o in range(out):
        for i in range(cin):
            w[o, i] = pointwise[o, i, 0, 0] * depthwise[i, 0]
    return w
