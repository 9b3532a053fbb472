"""``ICCConfig``: what to cache, how to calibrate it, and when to recompute."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import HfExtError

METHODS = ("ca-svd", "cd-svd", "svd", "rrr", "reuse")
GRANULARITIES = ("linear", "module")
# attention q/k/v/out (and the context stream of joint-attention models) and the MLP's two linears, inside
# the transformer blocks of DiT, PixArt, SD3 and Flux; adaLN modulation and embeddings are never cached
DEFAULT_TARGETS = (r"(transformer_blocks|single_transformer_blocks)\.\d+\."
                   r"(attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                   r"|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)$")
# granularity="module": whole attention and feed-forward modules of the same blocks (skipped when cached)
DEFAULT_MODULE_TARGETS = r"(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\d?|ff(_context)?)$"


class ICCError(HfExtError, ValueError):
    """Bad ICC settings, a transformer without cacheable blocks, or calibration factors of another model."""


@dataclass
class ICCConfig:
    """Increment-calibrated caching (https://arxiv.org/abs/2505.05829).

    Args:
        rank: rank r of the correction A B of every cached layer (must be < min(in, out)).
        method: how A B is obtained. ``ca-svd`` (channel-aware SVD of W, needs a calibration run),
            ``cd-svd`` (the same weighting measured on step-to-step increments), ``svd`` (plain SVD of W),
            ``rrr`` (reduced-rank ridge regression of the cached output's miss on the input's miss, fitted on a
            calibration run with this config's schedule; the only correction for ``granularity="module"``), or
            ``reuse`` (no correction).
        full_every: recompute everything every N transformer calls after the warmup (per cache context).
        warmup: the first ``warmup`` calls are always full (the forecast needs history; early steps move most).
        forecast: Taylor order of the forecast of each cached input and output from the last ``forecast + 1``
            full steps (polynomial extrapolation in the step index). 0 is the paper's ICC: a cached step returns
            ŷ + A B (x - x̂) from the last full step. With order k it returns y_f + A B (x - x_f), the forecasts
            corrected by the part of the input the forecast missed (hf-ext's forecast-and-correct).
        granularity: ``linear`` (the paper: every targeted linear layer is cached; attention, norms and
            nonlinearities still run) or ``module`` (whole attention / feed-forward modules are skipped when
            cached, as TaylorSeer does, and corrected with ``method="rrr"``).
        threshold: if set, adaptive schedule instead: a step is full when the relative size of the input
            increment ||x - x̂|| / ||x̂|| of the first targeted layer exceeds it.
        clamp: CA-SVD channel scales are clamped to at least max / clamp.
        ridge: ``rrr``'s ridge, relative to the mean input energy (keeps the fit well posed).
        targets: regular expression on module names selecting the cached layers (default: by granularity).
    """

    rank: int = 128                    # a DiT-XL layer is 1152 wide; also `hf-ext convert icc`'s default
    method: str = "ca-svd"
    full_every: int = 2
    warmup: int = 0
    forecast: int = 0
    granularity: str = "linear"
    threshold: float | None = None
    clamp: float = 100.0
    ridge: float = 1e-3
    targets: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ICCError(f"method '{self.method}' is unknown; use one of {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise ICCError(f"granularity '{self.granularity}' is unknown; use 'linear' or 'module'")
        if self.granularity == "module" and self.method not in ("rrr", "reuse"):
            raise ICCError(f"method '{self.method}' factorises one weight matrix, and an attention or feed-forward "
                           "module has several: use method='rrr' (or 'reuse') with granularity='module'")
        if self.rank < 1:
            raise ICCError(f"rank={self.rank}; give a rank >= 1 (smaller than every layer's min(in, out))")
        if self.full_every < 1 or self.warmup < 0:
            raise ICCError(f"full_every={self.full_every}, warmup={self.warmup}; give full_every >= 1 (1: no caching) "
                           "and warmup >= 0")
        if not 0 <= self.forecast <= 3:
            raise ICCError(f"forecast={self.forecast}; give a Taylor order from 0 (the paper's ICC) to 3")
        if self.threshold is not None and self.threshold <= 0:
            raise ICCError(f"threshold={self.threshold}; give a positive relative increment, or None")
        if self.threshold is not None and self.method == "rrr":
            raise ICCError("method='rrr' is fitted to a fixed schedule; give full_every/warmup instead of a threshold")
        if self.ridge <= 0:
            raise ICCError(f"ridge={self.ridge}; give a positive relative ridge (1e-3 is a safe default)")
        if self.targets is None:
            self.targets = DEFAULT_TARGETS if self.granularity == "linear" else DEFAULT_MODULE_TARGETS
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ICCError(f"targets is not a valid regular expression ({e})") from e

    def is_full(self, step: int) -> bool:
        """Whether call ``step`` (0-based, per cache context) of the fixed schedule recomputes everything."""
        return step < self.warmup or (step - self.warmup) % self.full_every == 0
