"""Pure math of increment-calibrated caching: low-rank factors of a linear layer and the cached step.

Paper: Accelerating Diffusion Transformer via Increment-Calibrated Caching with Channel-Aware Singular
Value Decomposition (2025), https://arxiv.org/abs/2505.05829

A linear layer y = W x + b computed at a full step gives (x̂, ŷ). At a cached step ICC returns
    y ≈ ŷ + A B (x - x̂),     A: (out, r), B: (r, in), A B ≈ W,
costing N (in + out) r multiply-accumulates instead of N in out. Plain SVD takes A = U_r Σ_r, B = V_rᵀ.
Channel-aware SVD (CA-SVD) factorises diag(l) W diag(r) instead, with r_j = sqrt(mean|x_j|) and
l_i = sqrt(mean|y_i|) from a calibration run (each clamped to at least max / ``clamp``), then undoes the
scaling: A = diag(l)⁻¹ U_r Σ_r, B = V_rᵀ diag(r)⁻¹. Input and output channels that carry large
activations are approximated better, which is where the increment's error would be largest.
"""
from __future__ import annotations

import torch


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``weight`` (out, in): ``A`` (out, r), ``B`` (r, in), in float32."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank].contiguous()


def _clamped_sqrt(absmean: torch.Tensor, clamp: float) -> torch.Tensor:
    s = absmean.detach().float().clamp_min(0).sqrt()
    return s.clamp_min(s.max() / clamp).clamp_min(1e-12)


def ca_svd_factors(weight: torch.Tensor, x_absmean: torch.Tensor, y_absmean: torch.Tensor, rank: int,
                   clamp: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-aware SVD factors (see the module docstring). ``x_absmean``: (in,), ``y_absmean``: (out,)."""
    r, l = _clamped_sqrt(x_absmean, clamp), _clamped_sqrt(y_absmean, clamp)
    U, S, Vh = torch.linalg.svd(l[:, None] * weight.detach().float() * r[None, :], full_matrices=False)
    return (U[:, :rank] * S[:rank]) / l[:, None], Vh[:rank] / r[None, :]


def icc_step(x: torch.Tensor, x_hat: torch.Tensor, y_hat: torch.Tensor, A: torch.Tensor | None,
             B: torch.Tensor | None) -> torch.Tensor:
    """The cached output ŷ + A B (x - x̂); ``A = B = None`` is naive reuse (ŷ). x: (..., in) -> (..., out)."""
    if A is None:
        return y_hat
    dx = (x - x_hat).to(B.dtype)                          # (..., in)
    return y_hat + ((dx @ B.T) @ A.T).to(y_hat.dtype)     # (..., r) -> (..., out)


def icc_step_projected(x: torch.Tensor, z_hat: torch.Tensor, y_hat: torch.Tensor, A: torch.Tensor,
                       B: torch.Tensor) -> torch.Tensor:
    """``icc_step`` with the full step's projection z_hat = x̂ Bᵀ (N, r) kept instead of x̂ (N, in).

    ŷ + A B (x - x̂) = ŷ + A (B x - ẑ): the subtraction happens in r dimensions and the final add is fused
    into one ``addmm``, so a cached step reads x once and ŷ once. x: (..., in), y_hat: (..., out).
    """
    x2 = x.reshape(-1, x.shape[-1]).to(B.dtype)                              # (N, in)
    dz = x2 @ B.T - z_hat                                                    # (N, r)
    y = torch.addmm(y_hat.reshape(-1, y_hat.shape[-1]).to(A.dtype), dz, A.T)  # (N, out)
    return y.view(y_hat.shape).to(y_hat.dtype)


def icc_step_naive(x, x_hat, y_hat, A, B):
    """Reference: form the rank-r matrix W_r = A B and apply it to the increment."""
    if A is None:
        return y_hat
    return y_hat + torch.einsum("oi,...i->...o", (A @ B).double(), (x - x_hat).double()).to(y_hat.dtype)
