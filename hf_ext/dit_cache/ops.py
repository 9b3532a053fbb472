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

Forecast and correct (hf-ext, after TaylorSeer https://arxiv.org/abs/2503.06923): instead of the last full
step, a cached step starts from the polynomial extrapolation of the last k + 1 full steps, for the output
and the input alike (``taylor_forecast``), and corrects by the input's miss: y ≈ y_f + A B (x - x_f). For a
linear layer with A B = W this is exact (extrapolation commutes with W), so the error is (W - A B)(x - x_f),
smaller than ICC's (W - A B)(x - x̂) whenever the forecast beats plain reuse. A whole attention or MLP
module has no single W: there ``rrr_factors`` fits the rank-r map from the input's miss to the output's miss
by reduced-rank ridge regression on a calibration run.
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


def taylor_forecast(history: list[tuple[int, torch.Tensor]], step: int, order: int) -> torch.Tensor:
    """Extrapolate to ``step`` the polynomial through the last ``order + 1`` points ``(step_k, value_k)`` of
    ``history`` (oldest first; fewer points give a lower order). Newton's divided differences, evaluated by
    Horner's rule: order 0 is the last value, order 1 the line through the last two."""
    pts = history[-(order + 1):]
    s, c = [p[0] for p in pts], [p[1] for p in pts]
    for j in range(1, len(pts)):                      # c[i] becomes the divided difference f[s_{i-j} .. s_i]
        for i in range(len(pts) - 1, j - 1, -1):
            c[i] = (c[i] - c[i - 1]) / (s[i] - s[i - j])
    y = c[-1]
    for i in range(len(pts) - 2, -1, -1):
        y = c[i] + (step - s[i]) * y
    return y


def taylor_forecast_naive(history, step: int, order: int) -> torch.Tensor:
    """Reference: Lagrange's form of the same polynomial, in float64."""
    pts = history[-(order + 1):]
    out = 0
    for i, (si, vi) in enumerate(pts):
        w = 1.0
        for j, (sj, _) in enumerate(pts):
            if j != i:
                w *= (step - sj) / (si - sj)
        out = out + w * vi.double()
    return out


def rrr_factors(xx: torch.Tensor, xy: torch.Tensor, rank: int, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank ridge regression from Gram sums: the rank-r map with dy ≈ A B dx.

    ``xx = Σ dx dxᵀ`` (in, in) and ``xy = Σ dx dyᵀ`` (in, out) over calibration rows. The full-rank ridge
    solution is M = (xx + λ I)⁻¹ xy with λ = ridge · tr(xx) / in; its rank-r truncation keeps the r directions
    of the output that the fit explains best (top eigenvectors V_r of Mᵀ xx M): M_r = M V_r V_rᵀ. Returns
    A = V_r (out, r) and B = (M V_r)ᵀ (r, in), in float32.
    """
    xx, xy = xx.double(), xy.double()
    lam = ridge * xx.diagonal().sum() / len(xx)
    M = torch.linalg.solve(xx + lam * torch.eye(len(xx), dtype=xx.dtype), xy)             # (in, out)
    _, V = torch.linalg.eigh(M.T @ xx @ M)                                                # ascending
    V = V[:, -rank:].flip(-1)                                                             # (out, r)
    return V.float().contiguous(), (M @ V).T.float().contiguous()


def rrr_factors_naive(dx: torch.Tensor, dy: torch.Tensor, rank: int, ridge: float = 1e-3):
    """Reference from the rows themselves (n, in), (n, out): ridge least squares by ``lstsq`` on the augmented
    system [dx; √λ I] M = [dy; 0], then the SVD of the fitted values dx M."""
    dx, dy = dx.double(), dy.double()
    n_in = dx.shape[1]
    lam = ridge * (dx * dx).sum() / n_in
    aug_x = torch.cat([dx, lam.sqrt() * torch.eye(n_in, dtype=dx.dtype)])
    aug_y = torch.cat([dy, torch.zeros(n_in, dy.shape[1], dtype=dy.dtype)])
    M = torch.linalg.lstsq(aug_x, aug_y).solution                                         # (in, out)
    V = torch.linalg.svd(dx @ M, full_matrices=False).Vh[:rank].T                         # (out, r)
    return M @ V @ V.T                                                                    # (in, out): dy ≈ dx M_r
