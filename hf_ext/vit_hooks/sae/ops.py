"""Pure tensor math of SAEs: JumpReLU's straight-through estimators and the geometric median (with a naive
reference beside it). No nn.Module, no config.

Papers: JumpReLU and Step with the rectangle kernel, Rajamanoharan et al. 2024, "Jumping Ahead",
https://arxiv.org/abs/2407.14435 ; the geometric median as b_dec's init, Bricken et al. 2023.
"""
from __future__ import annotations

import torch


def rectangle(x: torch.Tensor) -> torch.Tensor:
    """The kernel K(x) = 1{-1/2 < x < 1/2} of the JumpReLU paper's pseudo-derivatives."""
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLU(torch.autograd.Function):
    """z * H(z - theta). d/dz = H(z - theta); d/dtheta = -(theta/eps) K((z - theta)/eps) (paper eq. 11)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        d_theta = -(theta / ctx.eps) * rectangle((z - theta) / ctx.eps) * g
        return (z > theta).to(g.dtype) * g, d_theta.reshape(-1, z.shape[-1]).sum(0), None


class Step(torch.autograd.Function):
    """H(z - theta), for the L0 penalty. d/dz = 0; d/dtheta = -(1/eps) K((z - theta)/eps) (paper eq. 12)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        d_theta = -(1.0 / ctx.eps) * rectangle((z - theta) / ctx.eps) * g
        return None, d_theta.reshape(-1, z.shape[-1]).sum(0), None


def geometric_median(x: torch.Tensor, iters: int = 200, eps: float = 1e-8, tol: float = 1e-9) -> torch.Tensor:
    """argmin_y sum_i ||x_i - y||_2 by Weiszfeld's iteration, in float64. x: (N, d) -> (d,), x's dtype.

    Unlike the mean, it moves little when a few rows are outliers, which makes it a good b_dec (Bricken et al.).
    """
    xs = x.detach().double().reshape(-1, x.shape[-1])  # (N, d)
    y = xs.mean(0)                                      # (d,)
    for _ in range(iters):
        w = 1.0 / (xs - y).norm(dim=1).clamp_min(eps)   # (N,) inverse distances
        y_new = (w[:, None] * xs).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * max(1.0, float(y.norm()))
        y = y_new
        if done:
            break
    return y.to(x.dtype)


def geometric_median_naive(x: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """Reference: minimise the definition sum_i ||x_i - y|| with a generic optimiser (L-BFGS, float64)."""
    xs = x.detach().double()
    y = xs.mean(0).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([y], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = sum(torch.linalg.vector_norm(row - y) for row in xs)
        loss.backward()
        return loss

    opt.step(objective)
    return y.detach().to(x.dtype)


__all__ = ["JumpReLU", "Step", "geometric_median", "geometric_median_naive", "rectangle"]
