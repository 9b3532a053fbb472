"""``ICCConfig``: what to cache, how to calibrate it, and when to recompute."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import HfExtError

METHODS = ("ca-svd", "cd-svd", "svd", "reuse")
# attention q/k/v/out (and the context stream of joint-attention models) and the MLP's two linears, inside
# the transformer blocks of DiT, PixArt, SD3 and Flux; adaLN modulation and embeddings are never cached
DEFAULT_TARGETS = (r"(transformer_blocks|single_transformer_blocks)\.\d+\."
                   r"(attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                   r"|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)$")


class ICCError(HfExtError, ValueError):
    """Bad ICC settings, a transformer without cacheable blocks, or calibration factors of another model."""


@dataclass
class ICCConfig:
    """Increment-calibrated caching (https://arxiv.org/abs/2505.05829).

    Args:
        rank: rank r of the correction A B ≈ W of every targeted linear layer (must be < min(in, out)).
        method: ``ca-svd`` (channel-aware SVD, needs a calibration run), ``cd-svd`` (the same weighting
            measured on step-to-step increments instead of activations), ``svd`` (plain SVD of W) or
            ``reuse`` (no correction: a cached step returns the last full step's output).
        full_every: recompute everything every N transformer calls (per cache context); the first call is
            always full.
        threshold: if set, adaptive schedule instead: a step is full when the relative size of the input
            increment ||x - x̂|| / ||x̂|| of the first targeted layer exceeds it.
        clamp: CA-SVD channel scales are clamped to at least max / clamp.
        targets: regular expression on module names selecting the cached linear layers.
    """

    rank: int = 64
    method: str = "ca-svd"
    full_every: int = 2
    threshold: float | None = None
    clamp: float = 100.0
    targets: str = DEFAULT_TARGETS

    def __post_init__(self):
        if self.method not in METHODS:
            raise ICCError(f"method '{self.method}' is unknown; use one of {', '.join(METHODS)}")
        if self.rank < 1:
            raise ICCError(f"rank={self.rank}; give a rank >= 1 (smaller than every layer's min(in, out))")
        if self.full_every < 1:
            raise ICCError(f"full_every={self.full_every}; give 1 (no caching) or more")
        if self.threshold is not None and self.threshold <= 0:
            raise ICCError(f"threshold={self.threshold}; give a positive relative increment, or None")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ICCError(f"targets is not a valid regular expression ({e})") from e
