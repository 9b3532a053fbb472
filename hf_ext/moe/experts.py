"""The pre-gated MoE MLP: a dense MLP sliced into a shared expert and D routed experts (Read-ME).

Paper: https://arxiv.org/abs/2410.19123. Every expert is a slice of the dense MLP's neurons (rows of
gate/up or fc1, columns of down or fc2), so no weights are invented: with masks covering every neuron the
MoE MLP is the dense MLP. A token runs the shared expert plus the one routed expert its pre-gating router
chose (the same expert in every layer), i.e. ``shared + K`` of the ``N`` neurons.

Example:
    >>> moe = MoEMLP.from_dense(layer.mlp, masks.shared[i], masks.routed[i])   # doctest: +SKIP
    >>> moe(hidden, expert_ids)   # hidden (B, T, H), expert_ids (B, T)          # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import nn

from .extract import MoEError, decoder_mlps, mlp_kind


class MoEMLP(nn.Module):
    """Shared expert (S neurons) + D routed experts (K neurons each), sliced from one dense MLP."""

    def __init__(self, hidden: int, shared: int, experts: int, expert_size: int, act: nn.Module, gated: bool,
                 bias: bool = False):
        super().__init__()
        self.gated, self.act = gated, act
        n_in = 2 if gated else 1                                     # gate and up, or fc1
        self.shared_in = nn.Parameter(torch.empty(n_in, shared, hidden))              # (2|1, S, H)
        self.shared_out = nn.Parameter(torch.empty(hidden, shared))                   # (H, S)
        self.routed_in = nn.Parameter(torch.empty(experts, n_in, expert_size, hidden))  # (D, 2|1, K, H)
        self.routed_out = nn.Parameter(torch.empty(experts, hidden, expert_size))     # (D, H, K)
        self.shared_in_bias = nn.Parameter(torch.zeros(shared)) if bias else None
        self.routed_in_bias = nn.Parameter(torch.zeros(experts, expert_size)) if bias else None
        self.out_bias = nn.Parameter(torch.zeros(hidden)) if bias else None
        self.expert_ids: torch.Tensor | None = None                   # (B, T), set by the model before each call

    @classmethod
    @torch.no_grad()
    def from_dense(cls, mlp: nn.Module, shared_idx: torch.Tensor, routed_idx: torch.Tensor) -> "MoEMLP":
        kind, in_names, down_name = mlp_kind(mlp)
        gated = kind == "gated"
        ins, down = [getattr(mlp, n) for n in in_names], getattr(mlp, down_name)
        act = next((getattr(mlp, a) for a in ("act_fn", "act", "activation_fn") if hasattr(mlp, a)), None)
        if not isinstance(down, nn.Linear) or any(not isinstance(i, nn.Linear) for i in ins) or act is None:
            raise MoEError(f"{type(mlp).__name__}: only nn.Linear projections with an activation are supported")
        bias = ins[0].bias is not None
        D, K = routed_idx.shape
        w_in = torch.stack([i.weight for i in ins])                                    # (2|1, N, H)
        m = cls(w_in.shape[2], len(shared_idx), D, K, act, gated, bias).to(w_in.dtype)
        m.shared_in.copy_(w_in[:, shared_idx])
        m.shared_out.copy_(down.weight[:, shared_idx])
        m.routed_in.copy_(w_in[:, routed_idx].permute(1, 0, 2, 3))                      # (D, 2|1, K, H)
        m.routed_out.copy_(down.weight[:, routed_idx].permute(1, 0, 2))                 # (D, H, K)
        if bias:
            m.shared_in_bias.copy_(ins[0].bias[shared_idx])
            m.routed_in_bias.copy_(ins[0].bias[routed_idx])
            m.out_bias.copy_(down.bias)
        return m

    def _expert(self, x, w_in, w_out, b_in):
        h = x @ w_in[0].T if b_in is None else x @ w_in[0].T + b_in
        h = self.act(h) * (x @ w_in[1].T) if self.gated else self.act(h)
        return h @ w_out.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._expert(x, self.shared_in, self.shared_out, self.shared_in_bias)       # (B, T, H)
        if self.routed_in.shape[2] and self.expert_ids is not None:
            flat, ids = x.reshape(-1, x.shape[-1]), self.expert_ids.reshape(-1)          # (BT, H), (BT,)
            routed = torch.zeros_like(flat)
            for d in ids.unique().tolist():
                sel = (ids == d).nonzero().flatten()
                b = None if self.routed_in_bias is None else self.routed_in_bias[d]
                routed.index_add_(0, sel, self._expert(flat[sel], self.routed_in[d], self.routed_out[d], b))
            y = y + routed.view_as(y)
        return y if self.out_bias is None else y + self.out_bias


def moefy(model, masks) -> list[MoEMLP]:
    """Replace every decoder MLP of ``model`` by its ``MoEMLP`` (in place); returns them in layer order."""
    out = []
    for layer, (mlp, parent) in enumerate(zip(decoder_mlps(model), getattr(model, "model", model).layers)):
        moe = MoEMLP.from_dense(mlp, masks.shared[layer], masks.routed[layer])
        parent.mlp = moe
        out.append(moe)
    return out


def set_experts(mlps: list[MoEMLP], expert_ids: torch.Tensor) -> None:
    """Route every token (B, T) to one expert in every layer (the pre-gating contract)."""
    for m in mlps:
        m.expert_ids = expert_ids
