"""Dense causal LM -> ``PreGatedMoEForCausalLM``: a pure function of the model and the expert masks.

Paper: https://arxiv.org/abs/2410.19123. Attention, norms, embeddings and the head are copied unchanged;
each MLP becomes its shared + routed slices (``experts.py``); the router starts untrained (see
``router.py`` to train it).

Example:
    >>> from hf_ext.moe import activation_stats, expert_masks, convert_to_pregated_moe
    >>> masks = expert_masks(activation_stats(model, batches, clusters=8, labels=domains), top_p=0.5)  # doctest: +SKIP
    >>> moe = convert_to_pregated_moe(model, masks)  # doctest: +SKIP
"""
from __future__ import annotations

import torch

from .configuration_pregated_moe import PreGatedMoEConfig
from .experts import mlp_parts, moe_mlp_from_dense
from .extract import ExpertMasks, MoEError, decoder_mlps
from .modeling_pregated_moe import PreGatedMoEForCausalLM


@torch.no_grad()
def convert_to_pregated_moe(model, masks: ExpertMasks, router_hidden: int = 128, router_layers: int = 1,
                            router_heads: int = 4) -> PreGatedMoEForCausalLM:
    """A new ``PreGatedMoEForCausalLM`` holding ``model``'s weights, its MLPs split by ``masks``."""
    mlps = decoder_mlps(model)
    if len(masks.shared) != len(mlps):
        raise MoEError(f"the masks cover {len(masks.shared)} layers, the model has {len(mlps)}; recompute them")
    gated, ins, _, _ = mlp_parts(mlps[0])
    config = PreGatedMoEConfig(model.config.to_dict(), num_experts=masks.routed[0].shape[0],
                               shared_sizes=[len(s) for s in masks.shared],
                               expert_sizes=[r.shape[1] for r in masks.routed], gated_mlp=gated,
                               mlp_bias=ins[0].bias is not None, router_hidden=router_hidden,
                               router_layers=router_layers, router_heads=router_heads,
                               router_max_positions=getattr(model.config, "max_position_embeddings", 2048))
    dtype = next(model.parameters()).dtype
    moe = PreGatedMoEForCausalLM(config).to(dtype).eval()
    dense = model.state_dict()
    own = moe.state_dict()
    for k, v in own.items():
        if ".mlp." in k or k.startswith("router."):
            continue
        if k not in dense or dense[k].shape != v.shape:
            raise MoEError(f"the dense model has no weight '{k}' of shape {tuple(v.shape)}; unsupported architecture")
        v.copy_(dense[k])
    for layer, (mlp, target) in enumerate(zip(mlps, moe.model.layers)):
        target.mlp.load_state_dict(moe_mlp_from_dense(mlp, masks.shared[layer], masks.routed[layer]).state_dict())
    return moe
