"""Slicing a dense MLP into Read-ME experts: the shared expert and D routed experts.

Paper: https://arxiv.org/abs/2410.19123. Every expert is a slice of the dense MLP's neurons (rows of
gate/up or fc1, columns of down or fc2), so no weights are invented: with masks covering every neuron the
MoE MLP is the dense MLP.

Example:
    >>> moe = moe_mlp_from_dense(layer.mlp, masks.shared[i], masks.routed[i])   # doctest: +SKIP
    >>> moe.expert_ids = expert_ids; moe(hidden)   # hidden (B, T, H), expert_ids (B, T)  # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import nn

from .extract import MoEError, decoder_mlps, mlp_kind
from .modeling_pregated_moe import PreGatedMoEMLP


def mlp_parts(mlp: nn.Module) -> tuple[bool, list[nn.Linear], nn.Linear, nn.Module]:
    """(gated, input projections, down projection, activation) of a supported dense MLP."""
    kind, in_names, down_name = mlp_kind(mlp)
    ins, down = [getattr(mlp, n) for n in in_names], getattr(mlp, down_name)
    act = next((getattr(mlp, a) for a in ("act_fn", "act", "activation_fn") if hasattr(mlp, a)), None)
    if not isinstance(down, nn.Linear) or any(not isinstance(i, nn.Linear) for i in ins) or act is None:
        raise MoEError(f"{type(mlp).__name__}: only nn.Linear projections with an activation are supported")
    return kind == "gated", ins, down, act


@torch.no_grad()
def moe_mlp_from_dense(mlp: nn.Module, shared_idx: torch.Tensor, routed_idx: torch.Tensor) -> PreGatedMoEMLP:
    """The ``PreGatedMoEMLP`` whose shared expert holds neurons ``shared_idx`` (S,) and whose routed expert d
    holds ``routed_idx[d]`` (K,) of the dense ``mlp``."""
    gated, ins, down, act = mlp_parts(mlp)
    bias = ins[0].bias is not None
    D, K = routed_idx.shape
    w_in = torch.stack([i.weight for i in ins])                                      # (2|1, N, H)
    m = PreGatedMoEMLP(w_in.shape[2], len(shared_idx), D, K, act, gated, bias).to(w_in.dtype)
    m.shared_in.copy_(w_in[:, shared_idx])
    m.shared_out.copy_(down.weight[:, shared_idx])
    m.routed_in.copy_(w_in[:, routed_idx].permute(1, 0, 2, 3))                        # (D, 2|1, K, H)
    m.routed_out.copy_(down.weight[:, routed_idx].permute(1, 0, 2))                   # (D, H, K)
    if bias:
        m.shared_in_bias.copy_(ins[0].bias[shared_idx])
        m.routed_in_bias.copy_(ins[0].bias[routed_idx])
        m.out_bias.copy_(down.bias)
    return m


def moefy(model, masks) -> list[PreGatedMoEMLP]:
    """Replace every decoder MLP of ``model`` by its MoE MLP (in place); returns them in layer order."""
    out = []
    for layer, (mlp, parent) in enumerate(zip(decoder_mlps(model), getattr(model, "model", model).layers)):
        moe = moe_mlp_from_dense(mlp, masks.shared[layer], masks.routed[layer])
        parent.mlp = moe
        out.append(moe)
    return out


def set_experts(mlps: list[PreGatedMoEMLP], expert_ids: torch.Tensor) -> None:
    """Route every token (B, T) to one expert in every layer (the pre-gating contract)."""
    for m in mlps:
        m.expert_ids = expert_ids
