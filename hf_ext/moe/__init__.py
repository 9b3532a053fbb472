"""Read-ME: dense LLM -> router-decoupled pre-gated MoE, with a lookahead expert cache.

Paper: https://arxiv.org/abs/2410.19123. ``extract``: expert masks from activation sparsity; ``convert``:
``convert_to_pregated_moe`` (a ``PreGatedMoEForCausalLM``, registered with the Auto classes);
``policy``: LRU / Belady expert-cache simulation on routing traces.

Example:
    >>> from hf_ext.moe import activation_stats, expert_masks, convert_to_pregated_moe
    >>> moe = convert_to_pregated_moe(model, expert_masks(activation_stats(model, batches, 8), 0.5))  # doctest: +SKIP
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_pregated_moe import PreGatedMoEConfig
from .modeling_pregated_moe import PreGatedMoEForCausalLM, PreGatedMoEMLP, PreGatingRouter

AutoConfig.register(PreGatedMoEConfig.model_type, PreGatedMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(PreGatedMoEConfig, PreGatedMoEForCausalLM, exist_ok=True)
PreGatedMoEConfig.register_for_auto_class()
PreGatedMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

from .convert import convert_to_pregated_moe  # noqa: E402
from .extract import ExpertMasks, MoEError, activation_stats, expert_masks  # noqa: E402
from .policy import hits, optimal_hits_brute_force  # noqa: E402

__all__ = ["ExpertMasks", "MoEError", "PreGatedMoEConfig", "PreGatedMoEForCausalLM", "PreGatedMoEMLP",
           "PreGatingRouter", "activation_stats", "convert_to_pregated_moe", "expert_masks", "hits",
           "optimal_hits_brute_force"]
