"""TinySR's model surgery: new, smaller models made from a trained one, and ``rebuild``, the one way they are made.

TinySR (https://arxiv.org/abs/2508.17434) turns a trained ``OneStepSRTransformer2DModel`` into its student's
layouts (the layouts themselves are in ``hf_ext.sr.onestep.modeling_onestep_sr``):
- ``precache``: the time/prompt embeddings and every AdaLN modulation, fixed by the timestep and prompt, become
  stored buffers and the modules that made them are dropped (bit-identical, tested).
- ``keep_blocks``: depth pruning made real: only the kept blocks, renumbered, so fewer parameters.
- ``drop_text_stream``: TinySR's ``TinySD3Transformer2DModel``, without the prompt tokens and their weights.
``rebuild`` (a model from another's config with changes, on its device and dtype, with its weights) is shared
with the VAE compressions (``vae_compression.py``, ``vae_channel_pruning.py``).

Example:
    >>> from hf_ext.sr import OneStepSRTransformer2DModel
    >>> model = OneStepSRTransformer2DModel(num_layers=4, num_attention_heads=2, attention_head_dim=16)
    >>> precache(keep_blocks(model, [0, 2])).config.num_layers
    2
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..onestep.modeling_onestep_sr import OneStepSRTransformer2DModel


def rebuild(model, cls=None, weights=True, **changes):
    """A fresh ``cls`` (default: ``model``'s class) built from ``model``'s config with ``changes``, on ``model``'s
    device, in its dtype and in its train/eval mode.

    ``weights``: True loads every weight of ``model`` whose name the new model has; a state dict loads those of
    its tensors instead; False leaves the new model as initialized (the caller fills it). A weight the new model
    needs but is not given raises ``RuntimeError``. The config goes in without diffusers' private ``_`` keys:
    ``_use_default_values`` would otherwise reset every changed key that the original left at its default. The
    dtype is cast before loading, so a float64 model keeps its bits (loading into float32 would round them).

    Example:
        >>> smaller = rebuild(vae, mid_block_add_attention=False)          # doctest: +SKIP
    """
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    out = (cls or type(model)).from_config({**cfg, **changes}).to(model.device)
    if out.dtype != model.dtype:                            # cast only when they differ: diffusers warns on each
        out = out.to(dtype=model.dtype)
    out.train(model.training)
    if weights is not False:
        state = model.state_dict() if weights is True else weights
        wanted = out.state_dict()
        missing = out.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False).missing_keys
        if missing:
            raise RuntimeError(f"weights the new {type(out).__name__} needs but the original lacks: {missing}")
    return out


@torch.no_grad()
def precache(model: OneStepSRTransformer2DModel) -> OneStepSRTransformer2DModel:
    """A copy whose time/prompt embeddings and AdaLN modulations are stored, the modules that made them removed."""
    if model.config.precached:
        return copy.deepcopy(model)
    temb, ctx, mod = model.conditioning(1)                                  # (1, D), (1, L, D) or None, (1, 2D)
    cached = {"temb": temb, "out_modulation": mod, **({} if ctx is None else {"context": ctx})}
    for i, block in enumerate(model.transformer_blocks):
        for name in ("norm1", "norm1_context")[:1 + model.config.text_stream]:
            cached[f"transformer_blocks.{i}.{name}.linear.value"] = getattr(block, name).linear(F.silu(temb))
    return rebuild(model, OneStepSRTransformer2DModel, weights={**model.state_dict(), **cached}, precached=True)


@torch.no_grad()
def keep_blocks(model: OneStepSRTransformer2DModel, keep: list[int]) -> OneStepSRTransformer2DModel:
    """A model with only the blocks ``keep`` (in order): depth pruning made real, fewer parameters."""
    n = model.config.num_layers
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"keep={keep}: give increasing block indices in [0, {n})")
    renumber = {f"transformer_blocks.{i}.": f"transformer_blocks.{j}." for j, i in enumerate(keep)}
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("transformer_blocks."):
            prefix = ".".join(k.split(".")[:2]) + "."
            if prefix not in renumber:
                continue
            k = renumber[prefix] + k[len(prefix):]
        state[k] = v
    state["block_mask"] = model.block_mask[keep].clone()
    return rebuild(model, OneStepSRTransformer2DModel, weights=state, num_layers=len(keep),
                   context_pre_only_last=model.config.context_pre_only_last and n - 1 in keep)


@torch.no_grad()
def drop_text_stream(model: OneStepSRTransformer2DModel) -> OneStepSRTransformer2DModel:
    """A copy without the prompt tokens (TinySR's ``TinySD3Transformer2DModel``): the prompt embeddings, the
    context embedder and every block's context half (``norm1_context``, ``add_{q,k,v}_proj``, ``to_add_out``,
    ``norm2_context``, ``ff_context``) are removed; the image half keeps its weights. It computes what ``model``
    would with a prompt of no tokens, a different function from ``model``'s, so distil it afterwards
    (``compress_tinysr(..., TinySRConfig(drop_text_stream=True))`` does)."""
    if not model.config.text_stream:
        return copy.deepcopy(model)
    if model.config.precached:
        raise ValueError("drop the text stream before pre-caching: the cached modulations come from the kept weights")
    return rebuild(model, OneStepSRTransformer2DModel, text_stream=False)
