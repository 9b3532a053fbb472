"""Sparse autoencoders over hook-point activations: the SAE module, its SAELens layout, training and evaluation.

- ``configuration_sae.py``: ``SAEConfig`` / ``SAEError`` and the SAELens ``cfg.json`` layout.
- ``ops.py``: pure tensor math: JumpReLU's straight-through estimators, the geometric median (+ naive reference).
- ``modeling_sae.py``: ``SparseAutoencoder`` (standard, top-k, JumpReLU), with the papers; save / load.
- ``evaluate.py``: rows from an activation store, the held-out split and ``evaluate_sae``.
- ``train.py``: ``SAETrainConfig``, ``train_sae`` (through accelerate) and ``resample_dead_latents``.

Example:
    >>> from hf_ext.vit_hooks.sae import SAEConfig, SparseAutoencoder
    >>> SparseAutoencoder(SAEConfig(d_in=32, d_sae=128, architecture="topk", k=4))
    SparseAutoencoder(topk, d_in=32, d_sae=128, k=4)
"""
from .configuration_sae import ARCHITECTURES, SAEConfig, SAEError
from .evaluate import evaluate_sae, open_activations, split_indices
from .modeling_sae import SparseAutoencoder
from .ops import geometric_median, geometric_median_naive
from .train import SAETrainConfig, resample_dead_latents, train_sae

__all__ = ["ARCHITECTURES", "SAEConfig", "SAEError", "SAETrainConfig", "SparseAutoencoder", "evaluate_sae",
           "geometric_median", "geometric_median_naive", "open_activations", "resample_dead_latents",
           "split_indices", "train_sae"]
