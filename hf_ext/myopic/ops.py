"""Myopic attention: forward values of standard attention, gradients of myopic descent.

Paper: "Do language models plan ahead for future tokens?" (Wu, Morris & Levine, 2024),
https://arxiv.org/abs/2404.00859

Myopic descent keeps only the diagonal terms of the gradient: the loss at position t sends no gradient
through the computation of any earlier position s < t. Attention is the only place positions meet, so
it is enough that, for query t,

    logits  l_ts = q_t . sg(k_s)  (s < t),   l_tt = q_t . k_t
    output  o_t  = sum_{s<t} a_ts sg(v_s) + a_tt v_t

(sg = stop-gradient). ``myopic_attention`` computes this in one pass: attention over detached K/V plus
zero-valued correction terms on the diagonal that carry the missing gradients. ``local_window`` = w
keeps gradients within the last w positions (w = 1 is myopic; the paper's "local myopic").

``myopic_grads_naive`` is the reference, straight from the untied-parameters definition: for every t,
L_t is backpropagated through position t alone, with the states of earlier positions computed without
gradient (a KV cache built under ``no_grad``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv  # (B, Hkv, S, D) -> (B, H, S, D)

UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


def _band(t: int, s: int, w: int, device) -> torch.Tensor:
    """(T, S) bool: key j lies in the last w positions of query i (the queries are the last T keys)."""
    d = torch.arange(t, device=device)[:, None] + (s - t) - torch.arange(s, device=device)[None, :]
    return (d >= 0) & (d < w)


def myopic_attention(query, key, value, attention_mask=None, scaling=None, dropout: float = 0.0,
                     training: bool = False, local_window: int | None = None):
    """query (B, H, T, D), key/value (B, Hkv, S, D), S >= T (the queries are the last T positions);
    attention_mask additive float or bool (B|1, 1, T, S). Returns out (B, T, H, D), probs (B, H, T, S)."""
    if local_window is not None and local_window < 1:
        raise ValueError(f"local_window={local_window}: give a window of at least 1 position (1 = myopic)")
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    t, s = query.shape[2], key.shape[2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    k0, v0 = key.detach(), value.detach()
    scores = torch.matmul(query, k0.transpose(2, 3)) * scaling             # (B, H, T, S): past keys frozen
    w = local_window or 1
    if w == 1:                                      # the diagonal: each query's own key, value 0, live gradient
        k_own = key[:, :, s - t:]                                             # (B, H, T, D)
        live = ((query.detach() * (k_own - k_own.detach())).sum(-1) * scaling).unsqueeze(-1)  # (B, H, T, 1)
        band = _band(t, s, 1, query.device)
        scores = scores + live * band
    else:
        band = _band(t, s, w, query.device)
        scores = scores + torch.matmul(query.detach(), (key - k0).transpose(2, 3)) * scaling * band
    if attention_mask is not None:
        mask = attention_mask[..., :s]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    out = torch.matmul(probs, v0)                                             # (B, H, T, D)
    if w == 1:                                      # a_tt (v_t - sg(v_t)): value 0, gradient a_tt to v_t
        v_own = value[:, :, s - t:]                                           # (B, H, T, D)
        a_own = probs.diagonal(offset=s - t, dim1=-2, dim2=-1).unsqueeze(-1)   # (B, H, T, 1)
        out = out + a_own * (v_own - v_own.detach())
    else:
        out = out + torch.matmul(probs * band, value - v0)
    return out.transpose(1, 2).contiguous(), probs


def attention_reference(query, key, value, attention_mask=None, scaling=None):
    """Plain softmax attention with the same conventions (for forward checks)."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[2]]
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), value).transpose(1, 2)


def myopic_attention_naive(query, key, value, attention_mask=None, scaling=None, local_window: int | None = None):
    """Per-query loops, from the definition: for query t, keys/values of positions older than the window
    are detached. Same conventions as ``myopic_attention``; slow, for tests."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    t_len, s_len, w = query.shape[2], key.shape[2], local_window or 1
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    rows = []
    for t in range(t_len):
        pos = t + s_len - t_len
        live = [(pos - s) < w for s in range(s_len)]
        k = torch.stack([key[:, :, s] if live[s] else key[:, :, s].detach() for s in range(s_len)], 2)
        v = torch.stack([value[:, :, s] if live[s] else value[:, :, s].detach() for s in range(s_len)], 2)
        sc = torch.einsum("bhd,bhsd->bhs", query[:, :, t], k) * scaling
        if attention_mask is not None:
            sc = sc + attention_mask[:, :, t, :s_len]
        rows.append(torch.einsum("bhs,bhsd->bhd", F.softmax(sc, dim=-1, dtype=torch.float32).to(query.dtype), v))
    return torch.stack(rows, 1)                                                 # (B, T, H, D)


def myopic_grads_naive(model, input_ids, attention_mask=None, labels=None) -> dict:
    """Reference myopic gradients of the causal-LM loss, from the untied-parameters definition.

    The loss is transformers' (mean next-token cross-entropy over targets ``labels[:, 1:] != -100``).
    For each position t: positions < t run under ``no_grad`` into a KV cache (every state of an earlier
    position is a constant, parameters included), position t runs on top of it with gradients, and
    L_t / N is backpropagated. O(T) forwards, for tests on tiny models. Returns {parameter name: grad}.
    """
    b, t_len = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    labels = input_ids if labels is None else labels
    scored = labels[:, 1:] != -100                                            # (B, T-1)
    n = scored.sum()
    model.zero_grad(set_to_none=True)
    for t in range(t_len - 1):
        if not scored[:, t].any():
            continue
        cache = None
        if t > 0:
            with torch.no_grad():
                cache = model(input_ids[:, :t], attention_mask=mask[:, :t], use_cache=True).cache
        logits = model(input_ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                       use_cache=cache is not None).logits[:, -1]                # (B, V)
        nll = F.cross_entropy(logits.float(), labels[:, t + 1].clamp(min=0), reduction="none")
        (nll[scored[:, t]].sum() / n).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
