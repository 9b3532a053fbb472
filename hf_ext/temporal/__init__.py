"""TFMQ: temporal features cached per sampler step, and timestep-aware quantization.

Paper: TFMQ-DM, https://arxiv.org/abs/2311.16503. ``apply_temporal_cache(model, scheduler, steps)`` replaces
the Temporal Information Block (time embedding, time-embedding MLP, per-block modulation projections) of a
DiT, PixArt or UNet with a per-step lookup table that can be saved and loaded.

Example:
    >>> from diffusers import DDIMScheduler
    >>> from hf_ext.temporal import apply_temporal_cache, remove_temporal_cache
    >>> cache = apply_temporal_cache(transformer, DDIMScheduler(), num_inference_steps=25)  # doctest: +SKIP
"""
from .cache import TemporalFeatureCache, apply_temporal_cache, remove_temporal_cache
from .tib import TIB, TemporalError, find_tib

__all__ = ["TIB", "TemporalError", "TemporalFeatureCache", "apply_temporal_cache", "find_tib", "remove_temporal_cache"]
