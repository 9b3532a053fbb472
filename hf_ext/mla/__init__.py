"""MLA upcycling (X-EcoMLA / MHA2MLA / TransMLA): Llama-family attention -> Multi-head Latent Attention.

    >>> from hf_ext.mla import upcycle_to_mla, UpcycleConfig
    >>> mla, report = upcycle_to_mla(model, UpcycleConfig(kv_ratio=6.4), calib_ids=ids)  # doctest: +SKIP
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_mla import MLAConfig
from .modeling_mla import MLAForCausalLM, MLALatentLayer, MLAModel, latent_cache_bytes

AutoConfig.register(MLAConfig.model_type, MLAConfig, exist_ok=True)
AutoModelForCausalLM.register(MLAConfig, MLAForCausalLM, exist_ok=True)
MLAConfig.register_for_auto_class()
MLAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MLAConfig", "MLAForCausalLM", "MLAModel", "MLALatentLayer", "latent_cache_bytes"]

from .convert import SUPPORTED, UpcycleConfig, UpcycleError, upcycle_to_mla  # noqa: E402
from .upcycle_config import resolve_target_dims  # noqa: E402

__all__ += ["SUPPORTED", "UpcycleConfig", "UpcycleError", "resolve_target_dims", "upcycle_to_mla"]
from .export import ExportError, export_deepseek_v3, save_deepseek_v3  # noqa: E402

__all__ += ["ExportError", "export_deepseek_v3", "save_deepseek_v3"]
