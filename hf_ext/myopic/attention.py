"""The ``"myopic"`` attention implementation, registered with transformers' AttentionInterface.

Any model whose attention goes through the interface trains myopically with
``from_pretrained(..., attn_implementation="myopic")`` or ``model.set_attn_implementation("myopic")``.
Covered (tested against the reference): Llama, Qwen2, Mistral (sliding window too), GPT-2, GPT-NeoX.
Attention variants with logit soft-capping or attention sinks are refused.

Masks come from transformers' ``eager_mask`` (additive float, padding and sliding windows included).
"""
from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..errors import HfExtError
from .ops import UNSUPPORTED_KWARGS, myopic_attention

NAME = "myopic"
LOCAL_WINDOW_ATTR = "myopic_local_window"  # on the model config: None = myopic, w = local myopic


class MyopicError(HfExtError, ValueError):
    pass


def myopic_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface signature: q (B, H, T, D), k/v (B, Hkv, S, D) -> (out (B, T, H, D), probs)."""
    bad = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if bad:
        raise MyopicError(f"{type(module).__name__} passes {', '.join(bad)} to attention, which myopic attention "
                          f"does not implement; use a model without it (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX)")
    w = getattr(getattr(module, "config", None), LOCAL_WINDOW_ATTR, None)
    counter = getattr(module, "_myopic_calls", None)
    module._myopic_calls = (counter or 0) + 1
    return myopic_attention(query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                            training=module.training, local_window=w)


AttentionInterface.register(NAME, myopic_attention_forward)
AttentionMaskInterface.register(NAME, eager_mask)


def enable_myopic(model, local_window: int | None = None):
    """Switch ``model`` to myopic attention in place (``local_window`` w: gradients flow within the last
    w positions; None = myopic). Raises ``MyopicError`` for a model whose attention does not go through
    transformers' AttentionInterface, instead of silently training it vanilla.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from hf_ext.myopic import enable_myopic
        >>> model = enable_myopic(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M"))  # doctest: +SKIP
    """
    if local_window is not None and (int(local_window) != local_window or local_window < 1):
        raise MyopicError(f"local_window={local_window}: give a whole number of positions >= 1 (1 = myopic)")
    if not type(model).is_backend_compatible():
        raise MyopicError(f"model type '{model.config.model_type}' ({type(model).__name__}) does not route its "
                          "attention through transformers' AttentionInterface, so it cannot train myopically; "
                          "supported: llama, qwen2, mistral, gpt2, gpt_neox and other interface models")
    model.set_attn_implementation(NAME)
    for cfg in {id(c): c for c in _configs(model)}.values():
        if local_window is not None:
            setattr(cfg, LOCAL_WINDOW_ATTR, local_window)
        elif hasattr(cfg, LOCAL_WINDOW_ATTR):
            delattr(cfg, LOCAL_WINDOW_ATTR)
    return model


def _configs(model):
    yield model.config
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "to_dict"):
            yield c


def count_myopic_calls(model) -> int:
    """How many attention calls went through the myopic function since the last reset (and reset)."""
    n = 0
    for m in model.modules():
        n += getattr(m, "_myopic_calls", 0) or 0
        if hasattr(m, "_myopic_calls"):
            m._myopic_calls = 0
    return n
