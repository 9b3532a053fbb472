"""Prisma-style hook points on timm and transformers models, an activation store, and SAE training.

- ``HookedVision(model)``: TransformerLens-style names, ``run_with_cache``, ``run_with_hooks``, ``hooks()``.
- ``cache_activations``: stream a hook point into an hf-ext store (``hf_ext.data``), CLS-only or all tokens.
- ``SparseAutoencoder`` / ``train_sae``: standard, top-k and JumpReLU SAEs in SAELens's on-disk layout.

Layout: ``hooked.py`` (+ ``families.py``, ``attention.py``) hooks, ``store.py`` the activation store,
``splice.py`` spliced-in losses, ``loading.py`` loads a model to hook from a CLI spec, and ``sae/`` the SAEs.
The SAEs are a subpackage here, not a top-level ``hf_ext/sae/``: DESIGN.md's map puts SAE training inside
technique 5 (``hf_ext/vit_hooks/``), and they are trained on this package's activation store and scored by
splicing into ``HookedVision``. As a second sub-technique (module, maths, training) they get a folder of their own.

Example:
    >>> from hf_ext.vit_hooks import HookedVision
    >>> out, cache = HookedVision(model).run_with_cache(pixels, names_filter="blocks.5.hook_resid_post")  # doctest: +SKIP
"""
from .families import SUPPORTED, HookError
from .hooked import ActivationCache, HookedVision, HookPoint
from .sae import SAEConfig, SAEError, SAETrainConfig, SparseAutoencoder, evaluate_sae, train_sae
from .splice import spliced_loss
from .store import cache_activations, image_batches, text_batches

__all__ = ["SUPPORTED", "ActivationCache", "HookError", "HookPoint", "HookedVision", "SAEConfig", "SAEError",
           "SAETrainConfig", "SparseAutoencoder", "cache_activations", "evaluate_sae", "image_batches",
           "spliced_loss", "text_batches", "train_sae"]
