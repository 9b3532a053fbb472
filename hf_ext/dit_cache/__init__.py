"""ICC: increment-calibrated caching for diffusion transformers, as diffusers hooks.

Paper: https://arxiv.org/abs/2505.05829. ``apply_icc_cache(transformer, ICCConfig(...), factors)`` and
``remove_icc_cache(transformer)``; ``calibrate`` computes the low-rank factors (SVD or channel-aware SVD).

Example:
    >>> from hf_ext.dit_cache import ICCConfig, apply_icc_cache, calibrate
    >>> cfg = ICCConfig(rank=32, method="svd", full_every=2)
    >>> apply_icc_cache(transformer, cfg, calibrate(transformer, cfg))  # doctest: +SKIP
"""
from .config import ICCConfig, ICCError
from .calibration import calibrate, channel_stats, compute_factors, residual_stats, select_ridge
from .hooks import apply_icc_cache, enable_cache, icc_state, remove_icc_cache
from .io import load_factors, load_icc_transformer, save_factors

__all__ = ["ICCConfig", "ICCError", "apply_icc_cache", "calibrate", "channel_stats", "compute_factors", "enable_cache",
           "icc_state", "load_factors", "residual_stats", "load_icc_transformer", "remove_icc_cache", "save_factors",
           "select_ridge"]
