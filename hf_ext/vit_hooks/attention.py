"""An attention implementation that exposes q, k, v, the pattern and z to hooks (transformers models).

Fused kernels (sdpa, flash) never materialise the attention pattern, so ``hook_pattern`` needs a path that
does. While a hook on ``hook_q/k/v/pattern/z`` is active, ``HookedVision`` switches the model to
``attn_implementation="hf_ext_hooked"``, registered here with transformers' ``AttentionInterface``: eager
math (softmax in float32, as transformers' eager), with the hooks called in between. Residual-stream hooks
never switch it, so they keep the model's own (fused) attention and cost almost nothing.

Hook tensors use TransformerLens layouts: q/k/v/z ``(B, tokens, heads, d_head)``, pattern
``(B, heads, query, key)``. For decoders, q and k are after the rotary embedding.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import repeat_kv  # (B, Hkv, S, d) -> (B, H, S, d)

NAME = "hf_ext_hooked"
HOOKS_ATTR = "_hf_ext_attn_hooks"   # on the attention module: {"q"|"k"|"v"|"pattern"|"z": callable}


def _apply(hooks: dict, key: str, t: torch.Tensor, heads_last: bool) -> torch.Tensor:
    fn = hooks.get(key)
    if fn is None:
        return t
    shown = t.transpose(1, 2) if heads_last else t      # (B, H, N, d) -> (B, N, H, d)
    out = fn(shown)
    if out is None or out is shown:
        return t
    return out.transpose(1, 2) if heads_last else out


def hooked_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface signature: q (B, H, T, d), k/v (B, Hkv, S, d) -> (out (B, T, H, d), pattern)."""
    hooks = getattr(module, HOOKS_ATTR, None) or {}
    query = _apply(hooks, "q", query, True)
    key = _apply(hooks, "k", key, True)
    value = _apply(hooks, "v", value, True)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling                  # (B, H, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)
    pattern = _apply(hooks, "pattern", pattern, False)
    z = torch.matmul(pattern, value)                                             # (B, H, T, d)
    z = _apply(hooks, "z", z, True)
    return z.transpose(1, 2).contiguous(), pattern


AttentionInterface.register(NAME, hooked_attention_forward)
AttentionMaskInterface.register(NAME, eager_mask)
