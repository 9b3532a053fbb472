"""Prisma-style hook points on timm and transformers models, an activation store, and SAE training.

- ``HookedVision(model)``: TransformerLens-style names, ``run_with_cache``, ``run_with_hooks``, ``hooks()``.
- ``cache_activations``: stream a hook point into an hf-ext store (``hf_ext.data``), CLS-only or all tokens.
- ``SparseAutoencoder`` / ``train_sae``: standard, top-k and JumpReLU SAEs in SAELens's on-disk layout.

Example:
    >>> from hf_ext.vit_hooks import HookedVision
    >>> out, cache = HookedVision(model).run_with_cache(pixels, names_filter="blocks.5.hook_resid_post")  # doctest: +SKIP
"""
from .families import SUPPORTED, HookError
from .hooked import ActivationCache, HookedVision, HookPoint
from .sae import SAEConfig, SAEError, SparseAutoencoder
from .sae_train import SAETrainConfig, evaluate_sae, train_sae
from .splice import spliced_loss
from .store import cache_activations, image_batches, text_batches

__all__ = ["SUPPORTED", "ActivationCache", "HookError", "HookPoint", "HookedVision", "SAEConfig", "SAEError",
           "SAETrainConfig", "SparseAutoencoder", "cache_activations", "evaluate_sae", "image_batches",
           "spliced_loss", "text_batches", "train_sae"]
