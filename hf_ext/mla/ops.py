"""Pure tensor math for MLA upcycling (no modules, no configs).

Notation (per layer): hidden size h, source KV heads n_kv of width D, query heads H, RoPE pair i couples
dims (i, i + D/2) at frequency theta_i. Keys of all KV heads concatenated give a vector of n_kv*D values.

- ``second_moment``       E[(Wx+b)(Wx+b)^T] from calibration statistics C = E[x x^T], mu = E[x].
- ``rorope_rotation``     TransMLA's RoRoPE: per frequency, a PCA across KV heads of the pre-RoPE keys.
                          Mixing heads with one real matrix per frequency commutes with RoPE, so the
                          rotated keys are exact; the positional energy concentrates in few components.
- ``rope_sensitivity``    how much a RoPE pair's rotation matters over a context: rms of |2 sin(theta*d/2)|.
- ``mean_rotation``       E[R(-theta d)] over attention distances: the position-free stand-in for a pair
                          that leaves RoPE (MSE-optimal in expectation over d).
- ``weighted_lowrank``    the rank-r factorisation [K_nope; V] ~ W_up @ W_down that minimises the output
                          error E||D (M - W_up W_down) x||^2 for a row weighting D and input moment C.
- ``mla_attention_naive`` / ``mla_attention_absorbed``: reference MLA attention, expanded and absorbed.
"""
from __future__ import annotations

import math

import torch


def second_moment(W: torch.Tensor, b: torch.Tensor | None, C: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """E[y y^T] for y = W x + b, given C = E[x x^T] (h, h) and mu = E[x] (h,). W (o, h) -> (o, o)."""
    M = W @ C @ W.T
    if b is not None:
        Wm = W @ mu                                                        # (o,)
        M = M + torch.outer(Wm, b) + torch.outer(b, Wm) + torch.outer(b, b)
    return M


def pair_rows(i: int, D: int) -> tuple[int, int]:
    """The two dims of RoPE pair i in a rotate-half head of width D."""
    return i, i + D // 2


def rope_head_rows(pairs: list[tuple[int, int]], D: int) -> list[int]:
    """Rows, among the n_kv*D (rotated) keys, of one RoPE head's kept pairs ``[(i, j)]`` (frequency i of
    component j), in the head's rotate-half order: the first dim of every pair, then the second.

    Example:
        >>> rope_head_rows([(0, 1), (3, 0)], 8)
        [8, 3, 12, 7]
    """
    rows = [[j * D + d for d in pair_rows(i, D)] for i, j in pairs]         # (d_r/2, 2)
    return [a for a, _ in rows] + [b for _, b in rows]


def rorope_rotation(K: torch.Tensor, n_kv: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency PCA across KV heads of the keys' second moment K (n_kv*D, n_kv*D).

    Returns R (D/2, n_kv, n_kv), rows = components sorted by energy, and their energies (D/2, n_kv).
    Both dims of a pair are pooled, so the statistic is invariant to the RoPE rotation itself.
    """
    half = D // 2
    R, energy = torch.zeros(half, n_kv, n_kv, dtype=K.dtype), torch.zeros(half, n_kv, dtype=K.dtype)
    heads = torch.arange(n_kv) * D
    for i in range(half):
        Ci = sum(K[heads[:, None] + d, heads[None, :] + d] for d in pair_rows(i, D))  # (n_kv, n_kv)
        evals, evecs = torch.linalg.eigh(Ci)
        order = evals.argsort(descending=True)
        R[i], energy[i] = evecs[:, order].T, evals[order].clamp_min(0)
    return R, energy


def rotation_matrix(R: torch.Tensor, n_kv: int, D: int) -> torch.Tensor:
    """The (n_kv*D, n_kv*D) orthogonal map T of R: rotated component (j, dim) mixes dim of all heads."""
    T = torch.zeros(n_kv * D, n_kv * D, dtype=R.dtype)
    heads = torch.arange(n_kv) * D
    for i in range(D // 2):
        for d in pair_rows(i, D):
            T[heads[:, None] + d, heads[None, :] + d] = R[i]
    return T


def rope_sensitivity(inv_freq: torch.Tensor, horizon: int) -> torch.Tensor:
    """rms over distances 1..horizon of |e^{i theta d} - 1| = 2|sin(theta d / 2)|: the score error of
    treating a pair as position-free. ~0 for the slowest frequencies, ~sqrt(2) for fast ones."""
    d = torch.arange(1, horizon + 1, dtype=torch.float64)
    return (2 * torch.sin(inv_freq.double()[:, None] * d / 2)).pow(2).mean(-1).sqrt()


def best_rope_stride(scores: list[torch.Tensor], n_pairs: int) -> int:
    """The stride c whose frequencies 0, c, ..., (n_pairs - 1) c keep the most RoPE score over all layers.

    ``scores``: per layer, (half, n_components) pair scores. Each layer counts equally: its share is the kept
    score (the best component per kept frequency) over what an unconstrained choice of n_pairs would keep."""
    half = scores[0].shape[0]
    strides = range(1, (half - 1) // max(n_pairs - 1, 1) + 1) if n_pairs > 1 else [1]
    def share(s, c):                                                       # noqa: E306
        best = s.flatten().topk(n_pairs).values.sum().clamp_min(1e-300)
        return float(s[torch.arange(n_pairs) * c].max(-1).values.sum() / best)
    return max(strides, key=lambda c: sum(share(s, c) for s in scores))


def mean_rotation(inv_freq: torch.Tensor, p_delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E_p[cos(theta * d)], E_p[sin(theta * d)] per frequency, for distances d ~ p_delta (d = t - s >= 0).

    A pair that leaves RoPE scores q^T R(-theta d) k at distance d. The best position-free stand-in,
    in expectation over d, is q^T M k with M = E[R(-theta d)] = [[c, s], [-s, c]]: the query pair
    becomes (c*q_a - s*q_b, s*q_a + c*q_b). Fast pairs average out (M ~ 0), slow ones stay (M ~ I).
    The squared error left, 1 - c^2 - s^2, is the pair's rotation variance.
    """
    d = torch.arange(len(p_delta), dtype=torch.float64)
    ang = d[:, None] * inv_freq.double()[None]                              # (n_d, n_freq)
    p = p_delta.double()[:, None] / p_delta.sum()
    return (p * ang.cos()).sum(0), (p * ang.sin()).sum(0)


def psd_sqrt(A: torch.Tensor, inverse: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Symmetric square root (or inverse square root) of a PSD matrix, eigenvalues floored at eps*max."""
    evals, evecs = torch.linalg.eigh(A)
    evals = evals.clamp_min(eps * evals.max().clamp_min(1e-30))
    p = -0.5 if inverse else 0.5
    return (evecs * evals.pow(p)) @ evecs.T


def weighted_lowrank(M: torch.Tensor, C: torch.Tensor | None, rank: int, Dw: torch.Tensor | None = None):
    """Rank-``rank`` factorisation M (o, h) ~ W_up (o, r) @ W_down (r, h).

    Minimises E||Dw (M - W_up W_down) x||^2 with E[x x^T] = C (identity when None: plain SVD). The optimum
    projects onto the top eigenvectors U of S = Dw M C M^T Dw^T: W_down = U^T Dw M, W_up = Dw^-1 U. With
    full rank this is exact for any C and invertible Dw. Returns (W_up, W_down, eigenvalues of S, desc).
    """
    Y = M if Dw is None else Dw @ M
    S = Y @ Y.T if C is None else Y @ C @ Y.T
    evals, evecs = torch.linalg.eigh((S + S.T) / 2)
    order = evals.argsort(descending=True)
    evals, U = evals[order].clamp_min(0), evecs[:, order[:rank]]          # (o,), (o, r)
    if rank >= M.shape[0]:  # full rank needs no approximation: W_down = M exactly, no rounding through U
        return torch.eye(M.shape[0], rank, dtype=M.dtype), torch.cat([M, M.new_zeros(rank - M.shape[0], M.shape[1])]), evals
    W_down = U.T @ Y
    W_up = U if Dw is None else torch.linalg.solve(Dw, U)
    return W_up, W_down, evals


def rank_for_energy(evals: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r eigenvalues keep at least ``energy`` of the total."""
    frac = evals.cumsum(0) / evals.sum().clamp_min(1e-30)
    return int((frac < energy).sum().item()) + 1


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = positions[:, None].double() * inv_freq.double()[None]               # (T, n_freq)
    return f.cos(), f.sin()


def apply_rope_naive(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, d) rotate-half; cos/sin (T, d/2). Pair k = (k, k + d/2)."""
    h = x.shape[-1] // 2
    out = x.clone()
    for k in range(h):
        a, b = x[..., k], x[..., k + h]
        out[..., k], out[..., k + h] = a * cos[:, k] - b * sin[:, k], b * cos[:, k] + a * sin[:, k]
    return out


def mla_attention_naive(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale):
    """Expanded MLA attention, causal, loop over heads. q_nope (H, T, d_n), q_rope (H, T, d_r),
    c_kv (S, r), k_rope (S, d_r) shared, w_uk (H, d_n, r), w_uv (H, d_v, r) -> (T, H, d_v)."""
    H, T, _ = q_nope.shape
    S = c_kv.shape[0]
    out = []
    for h in range(H):
        k = torch.cat([c_kv @ w_uk[h].T, k_rope], -1)                       # (S, d_n + d_r)
        v = c_kv @ w_uv[h].T                                                # (S, d_v)
        s = torch.cat([q_nope[h], q_rope[h]], -1) @ k.T * scale             # (T, S)
        s = s.masked_fill(torch.arange(S)[None] > torch.arange(T)[:, None] + (S - T), -math.inf)
        out.append(s.softmax(-1) @ v)
    return torch.stack(out, 1)


def mla_attention_absorbed(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale):
    """Same result, absorbed: queries move into latent space and attention is MQA over [c_kv, k_rope]."""
    T, S = q_nope.shape[1], c_kv.shape[0]
    q_lat = torch.einsum("htd,hdr->htr", q_nope, w_uk)                     # (H, T, r)
    s = (q_lat @ c_kv.T + q_rope @ k_rope.T) * scale                        # (H, T, S)
    s = s.masked_fill(torch.arange(S)[None] > torch.arange(T)[:, None] + (S - T), -math.inf)
    o_lat = s.softmax(-1) @ c_kv                                            # (H, T, r)
    return torch.einsum("htr,hdr->thd", o_lat, w_uv)
