"""Count the multiply-accumulates a forward pass actually executes.

A ``TorchFunctionMode`` sees every ``F.linear``, ``F.conv2d``, ``F.scaled_dot_product_attention`` and
matrix product (``@``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``) that really runs, so skipped blocks (FirstBlockCache), reused attention (Pyramid Attention
Broadcast), forecast outputs (TaylorSeer) and ICC's low-rank corrections are all counted as they execute,
not from a formula.

Example:
    >>> from hf_ext.macs import count_macs
    >>> with count_macs() as macs:  # doctest: +SKIP
    ...     transformer(x, timestep=t, class_labels=y)
    >>> macs.total  # doctest: +SKIP
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _matmul_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.dim() == 1 or b.dim() == 1:
        return a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
    batch = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class count_macs(TorchFunctionMode):  # noqa: N801 (used as a context manager, like torch's own modes)
    """``with count_macs() as m: ...`` then ``m.total`` and ``m.by_op`` (MACs of linear, conv, attention, matmul)."""

    def __init__(self):
        super().__init__()
        self.by_op = {"linear": 0, "conv": 0, "attention": 0, "matmul": 0}

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self.by_op["linear"] += x.numel() // x.shape[-1] * w.shape[0] * w.shape[1]
        elif func in (F.conv1d, F.conv2d, F.conv3d):
            out = func(*args, **kwargs)
            w = args[1] if len(args) > 1 else kwargs["weight"]
            self.by_op["conv"] += out.numel() * math.prod(w.shape[1:])
            return out
        elif func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.by_op["attention"] += 2 * q.numel() // q.shape[-1] * k.shape[-2] * q.shape[-1]
        elif func in (torch.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.matmul, torch.mm):
            self.by_op["matmul"] += _matmul_macs(args[0], args[1])
        elif func in (torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm):   # C + A @ B
            self.by_op["matmul"] += _matmul_macs(args[1], args[2])
        return func(*args, **kwargs)
