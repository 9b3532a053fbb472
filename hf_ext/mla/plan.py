"""The per-layer plan of ``upcycle_to_mla``: which RoPE pairs stay rotary, the rotations, and the rank-r
factorisation of the rest of the keys with the values (X-EcoMLA / MHA2MLA / TransMLA, see ``convert.py``).

Each function is pure: weights and calibration statistics in, a ``LayerPlan`` out.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import ops
from .upcycle_config import Resolved, UpcycleConfig


@dataclass(frozen=True)
class LayerPlan:
    """One layer's upcycling plan in float64: ``plan_layer`` fills the geometry, ``factorisation`` the last three
    fields; the rank is chosen after every layer is planned (``_fill_attention`` applies it).

    Sizes: h hidden, H query heads, n_kv KV heads of width D, half = D/2 RoPE frequencies, F = n_kv*D - n_rope*d_r
    key rows that leave RoPE. "Rotated keys" are T k, T the RoRoPE rotation (``ops.rotation_matrix``; identity
    without it), so component j of frequency i mixes pair i of every KV head.
    """

    comps: list[list[tuple[int, int]]]  # per RoPE head, its d_r/2 kept pairs (frequency i, rotated component j)
    score: torch.Tensor                 # (half, n_kv) RoPE score of every (i, j); the selection keeps the best
    nope_idx: torch.Tensor              # (F,) rows of the rotated keys that leave RoPE, into the latent
    Wk_rot: torch.Tensor                # (n_kv*D, h) rotated key weights
    bk_rot: torch.Tensor | None         # (n_kv*D,) rotated key bias
    M: torch.Tensor                     # (F + n_kv*D, h) [K_nope; V], the matrix factorised to rank r
    G: torch.Tensor                     # (H, n_kv*D, D) G_h: query head h in the rotated key space (its slot
                                        # g(h); pairs that leave RoPE carry their mean rotation)
    Q: torch.Tensor                     # (H*D, H*D) E[q q^T] of the queries (of the normalised heads, qk_norm)
    g_of: torch.Tensor                  # (H,) KV head g(h) of each query head
    key_scale: torch.Tensor | None      # (n_kv*D,) qk_norm: s_g = sqrt(D / E|k_g|^2) on head g's D dims
    Dw: torch.Tensor | None = None      # (F + n_kv*D, F + n_kv*D) row weight of the factorisation; None: svd
    C: torch.Tensor | None = None       # (h, h) E[x x^T] weighting its inputs; None: svd (white inputs)
    evals: torch.Tensor | None = None   # (F + n_kv*D,) eigenvalues of Dw M C M^T Dw^T, descending


def layer_weights(attn, n_kv):
    f64 = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    w = dict(Wq=f64(attn.q_proj.weight), bq=f64(attn.q_proj.bias), Wk=f64(attn.k_proj.weight),
             bk=f64(attn.k_proj.bias), Wv=f64(attn.v_proj.weight), bv=f64(attn.v_proj.bias),
             Wo=f64(attn.o_proj.weight), bo=f64(attn.o_proj.bias), gq=None, gk=None)
    if hasattr(attn, "k_norm"):  # qk_norm: the source key to keep for its RMS, and both norms' gammas
        w.update(Wk_src=w["Wk"], gq=f64(attn.q_norm.weight), gk=f64(attn.k_norm.weight))
        w["Wk"] = w["gk"].repeat(n_kv)[:, None] * w["Wk"]  # targets are gamma . k; s_g is applied at run time
    return w


def plan_layer(w, C, mu, res: Resolved, inv_freq, p_delta=None) -> LayerPlan:
    """Rotation, RoPE selection and the stacked [K_nope; V] matrix of one layer (no rank chosen yet)."""
    ucfg, H, n_kv, D = res.config, res.H, res.n_kv, res.D
    g_of = torch.arange(H) // (H // n_kv)                                   # KV head of each query head
    K = _moment(w["Wk"], w["bk"], C, mu)
    Q = _moment(w["Wq"], w["bq"], C, mu)
    key_scale = None
    if w["gq"] is not None:  # qk_norm: moments of the normalised heads, gamma . y * sqrt(D / E|y_g|^2)
        key_scale = _inv_rms(w["Wk_src"], None, C, mu, n_kv, D)                # (n_kv*D,)
        q_scale = _inv_rms(w["Wq"], w["bq"], C, mu, H, D) * w["gq"].repeat(H)   # (H*D,)
        K, Q = K * torch.outer(key_scale, key_scale), Q * torch.outer(q_scale, q_scale)
    rot = None if p_delta is None else ops.mean_rotation(inv_freq, p_delta)  # (c, s): (half,) each
    if ucfg.rope_rotation == "rorope":
        R, k_energy = ops.rorope_rotation(K, n_kv, D)                        # (half, n_kv, n_kv), (half, n_kv)
    else:
        R = torch.eye(n_kv, dtype=torch.float64).expand(D // 2, n_kv, n_kv).clone()
        k_energy = _pair_energy(K, n_kv, D)                                   # (half, n_kv)
    T = ops.rotation_matrix(R, n_kv, D)                                      # (n_kv*D, n_kv*D)
    score = _rope_score(ucfg, R, k_energy, _pair_energy(Q, H, D), g_of, inv_freq, rot)  # (half, n_kv)
    comps = _select_pairs(score, ucfg, n_kv)
    rope_rows = {k for head in comps for k in ops.rope_head_rows(head, D)}
    nope_idx = torch.tensor([k for k in range(n_kv * D) if k not in rope_rows], dtype=torch.long)
    Wk_rot = T @ w["Wk"]                                                     # (n_kv*D, h) rotated keys
    bk_rot = None if w["bk"] is None else T @ w["bk"]
    M = torch.cat([Wk_rot[nope_idx], w["Wv"]], 0)                           # (F + n_kv*D, h)
    # Query of head h in the rotated key space: G_h (n_kv*D, D) = T[:, slot g(h)]
    G = torch.stack([T[:, g * D:(g + 1) * D] for g in g_of.tolist()])      # (H, n_kv*D, D)
    if ucfg.nope_rotation == "mean" and rot is not None:
        _mean_rotate_nope_pairs(G, comps, *rot, n_kv, D)
    return LayerPlan(comps=comps, score=score, nope_idx=nope_idx, Wk_rot=Wk_rot, bk_rot=bk_rot, M=M, G=G, Q=Q,
                     g_of=g_of, key_scale=key_scale)


def _rope_score(ucfg: UpcycleConfig, R, k_energy, q_pair, g_of, inv_freq, rot) -> torch.Tensor:
    """(half, n_kv) score of keeping pair i of rotated key component j rotary, by ``ucfg.rope_selection``.

    R (half, n_kv, n_kv) the rotation, k_energy (half, n_kv) its components' key energies, q_pair (half, H) each
    query head's pair energies, rot the measured mean rotation (c, s) or None (see the module docstring)."""
    # q energy of component (i, j): sum over heads of R[i, j, g(h)]^2 * E|q_{h,i}|^2
    q_comp = torch.einsum("ijh,ih->ijh", R[:, :, g_of] ** 2, q_pair)          # (half, n_kv, H)
    two_norm = (q_comp.sqrt().sum(-1)) * k_energy.sqrt()                     # (half, n_kv)
    if ucfg.rope_selection == "high_freq":                                   # fastest first, then energy
        return -torch.arange(k_energy.shape[0], dtype=torch.float64)[:, None] * 1e6 + k_energy
    if ucfg.rope_selection == "2norm":
        return two_norm
    if rot is not None:  # rotation variance under the measured attention distances
        c, s_ = rot
        return two_norm * (1 - c ** 2 - s_ ** 2).clamp_min(0).sqrt()[:, None]
    return two_norm * ops.rope_sensitivity(inv_freq, ucfg.rope_horizon)[:, None]


def _select_pairs(score, ucfg: UpcycleConfig, n_kv: int) -> list[list[tuple[int, int]]]:
    """Per RoPE head, the d_r/2 kept (frequency i, component j) pairs, from ``score`` (half, n_kv)."""
    n, c = ucfg.qk_rope_head_dim // 2, ucfg.rope_stride
    if ucfg.rope_selection == "geometric":   # frequencies 0, c, 2c, ...: the best component of each
        return [[(i, int(score[i].argmax())) for i in range(0, c * n, c)]]
    if ucfg.rope_key_sharing == "shared":
        top = score.flatten().argsort(descending=True)[:n]
        return [sorted((int(t) // n_kv, int(t) % n_kv) for t in top)]       # one RoPE head: [(i, j)]
    return [sorted((int(i), g) for i in score[:, g].argsort(descending=True)[:n]) for g in range(n_kv)]


def _mean_rotate_nope_pairs(G, comps, c, s_, n_kv: int, D: int) -> None:
    """In place on G (H, n_kv*D, D): each pair that leaves RoPE keeps its mean rotation E[R(-theta d)] =
    [[c, s], [-s, c]] (``ops.mean_rotation``), folded into the query side."""
    rope_pairs = {(i, j) for head in comps for i, j in head}
    for i in range(D // 2):
        for j in range(n_kv):
            if (i, j) not in rope_pairs:
                a, b = (j * D + d for d in ops.pair_rows(i, D))
                G[:, a], G[:, b] = c[i] * G[:, a] - s_[i] * G[:, b], s_[i] * G[:, a] + c[i] * G[:, b]


def _moment(W, b, C, mu):
    """E[y y^T] of y = W x + b; with no calibration (C None) the inputs count as white: W W^T."""
    return ops.second_moment(W, b, C, mu) if C is not None else W @ W.T


def _inv_rms(W, b, C, mu, n, D):
    """sqrt(D / E|y_g|^2) per head g of y = W x + b, repeated over the head's D dims: (n*D,)."""
    power = _moment(W, b, C, mu).diagonal().view(n, D).sum(-1)             # (n,)
    return (D / power.clamp_min(1e-30)).sqrt().repeat_interleave(D)


def _pair_energy(K, n_kv, D):
    half = D // 2
    diag = K.diagonal().view(n_kv, D)
    return (diag[:, :half] + diag[:, half:]).T                               # (half, n_kv)


def row_weight(plan: LayerPlan, w, C, res: Resolved):
    """Dw for weighted_lowrank: None (svd), block balance (whitened) or query/W_O aware (qo_whitened)."""
    ucfg, H, n_kv, D = res.config, res.H, res.n_kv, res.D
    F = len(plan.nope_idx)
    if ucfg.kv_init == "svd":
        return None
    Mk, Mv = plan.M[:F], plan.M[F:]
    if ucfg.kv_init == "whitened":
        Ak, Av = torch.eye(F, dtype=torch.float64), torch.eye(n_kv * D, dtype=torch.float64)
    else:
        Qh = plan.Q.view(H, D, H, D).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (H, D, D) per-head E[q q^T]
        Gn = plan.G[:, plan.nope_idx]                                         # (H, F, D)
        Ak = ops.psd_sqrt(torch.einsum("hfd,hde,hge->fg", Gn, Qh, Gn)) if F else torch.zeros(0, 0, dtype=torch.float64)
        Wo = w["Wo"].view(-1, H, D).permute(1, 2, 0)                          # (H, D, hidden): W_O of head h
        Av = torch.block_diag(*[ops.psd_sqrt(sum(Wo[h] @ Wo[h].T for h in range(H) if plan.g_of[h] == g))
                                for g in range(n_kv)])
    if plan.key_scale is not None:  # qk_norm: a key error is scaled by s_g like the key itself
        Ak = Ak * plan.key_scale[plan.nope_idx][None]
    ek = (Ak @ Mk @ C @ Mk.T @ Ak.T).trace() if F else torch.tensor(1.0)
    ev = (Av @ Mv @ C @ Mv.T @ Av.T).trace()
    # Balance: each block carries the same weighted energy, so neither K nor V starves the other.
    return torch.block_diag(Ak * (ucfg.key_weight / ek).sqrt().clamp_min(1e-30), Av / ev.sqrt().clamp_min(1e-30))


def factorisation(plan: LayerPlan, w, C, res: Resolved) -> LayerPlan:
    """The plan with what ``ops.weighted_lowrank`` needs: Dw (``row_weight``), C (identity when not calibrated;
    None for svd) and the eigenvalues of Dw M C M^T Dw^T, from which ``energy`` picks a rank."""
    C = C if C is not None else torch.eye(w["Wq"].shape[1], dtype=torch.float64)
    Dw = row_weight(plan, w, C, res)
    C = None if res.config.kv_init == "svd" else C
    Y = plan.M if Dw is None else Dw @ plan.M
    S = Y @ Y.T if C is None else Y @ C @ Y.T
    return replace(plan, Dw=Dw, C=C, evals=torch.linalg.eigvalsh((S + S.T) / 2).flip(0).clamp_min(0))


