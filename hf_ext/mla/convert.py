"""``upcycle_to_mla``: a Llama / Mistral / Qwen2 / Qwen3 causal LM -> ``MLAForCausalLM``, training-free.

Per layer:
1. Calibration statistics of the attention input x: C = E[x x^T], mu = E[x].
2. Keys of all KV heads are (optionally) rotated per RoPE frequency by RoRoPE (a PCA across heads that
   commutes with RoPE, so nothing is lost yet), then ``qk_rope_head_dim / 2`` pairs per RoPE head are kept
   rotary, chosen by ``rope_selection``:
   - ``"high_freq"``: the fastest frequencies (MHA2MLA's "high");
   - ``"2norm"``: largest E||q|| * E||k|| (MHA2MLA's S_2-norm);
   - ``"qk_freq"``: 2-norm times how much the pair's rotation moves the score over ``rope_horizon``
     tokens (``ops.rope_sensitivity``); a slow pair loses little by becoming position-free.
   - ``"geometric"``: the same score, but the kept frequencies must be every ``rope_stride``-th one from the
     fastest (0, c, 2c, ...), the same c in every layer: the only sets DeepSeek-V3's RoPE
     (inv_freq_j = theta'^(-2j/d_r)) can express. c is chosen by the score summed over layers.
3. Every other key dim, stacked with V, is factorised to rank ``kv_lora_rank`` (``kv_init``):
   ``"svd"`` on the weights, ``"whitened"`` on the calibration activations, or ``"qo_whitened"``, which
   also weights key errors by the query covariance and value errors by W_O, i.e. the errors of the
   attention logits and output the model actually sees.
4. Query rows are rotated to match, W_UK's column space is folded into the query (exact), a source value
   bias folds into o_proj's bias (softmax rows sum to 1), and a key bias off the RoPE dims is dropped
   (it adds a per-query constant to the logits, which softmax ignores).

With ``rope_key_sharing="per_kv_head"``, ``qk_rope_head_dim = head_dim`` and full rank, nothing is
approximated and the MLA model reproduces the source (see ``UpcycleConfig.lossless``).

Qwen3 (``qk_norm``) normalises each query and key head by an RMSNorm before RoPE. The MLA model keeps the
source query path and the exact per-head key scale s_g = 1 / rms(W_K,g x) (cached, n_kv values per token);
the latent approximates the gamma-weighted pre-norm keys, so attention sees s_g * (gamma . k), as the
source does. RoRoPE is not used there: mixing heads before their own norm is not linear.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from . import ops
from .calibration import attention_distances, collect_stats
from .configuration_mla import MLAConfig
from .export import DEEPSEEK_LATENT_EPS, fill_deepseek_latents
from .modeling_mla import MLAForCausalLM
from .plan import LayerPlan, factorisation, layer_weights, plan_layer
from .upcycle_config import (MIN_CALIB_TOKENS_PER_HIDDEN, SUPPORTED, Resolved, UpcycleConfig, UpcycleError,
                             resolve_upcycle, validate_upcycle)

__all__ = ["SUPPORTED", "UpcycleConfig", "UpcycleError", "upcycle_to_mla"]

def _calibrate(model, res: Resolved, calib_ids, calib_window: int, progress: bool):
    """Per layer, C = E[x x^T] and mu = E[x] of the attention input and the attention distances p_delta (Nones
    when the settings need no calibration). Returns ``(Cs, mus, p_deltas, calibration tokens)``."""
    h, L = model.config.hidden_size, model.config.num_hidden_layers
    if not res.config.needs_calibration():
        return [None] * L, [None] * L, [None] * L, 0
    need = MIN_CALIB_TOKENS_PER_HIDDEN * h
    if calib_ids is None or calib_ids.numel() < need:
        got = 0 if calib_ids is None else calib_ids.numel()
        raise UpcycleError(f"calibration text gives {got} tokens; this model needs at least {need} "
                           f"({MIN_CALIB_TOKENS_PER_HIDDEN} x hidden size {h}); give more --calib-text")
    Cs, mus, n_calib = collect_stats(model, calib_ids, calib_window, progress)
    return Cs, mus, attention_distances(model, calib_ids, calib_window, progress=progress), n_calib


def _plan_model(model, res: Resolved, Cs, mus, p_deltas, progress: bool):
    """Every layer's ``LayerPlan`` and float64 weights. A ``"geometric"`` selection that gave no stride plans with
    stride 1 first, then again with the stride ``ops.best_rope_stride`` picks from every layer's score (if
    another). Returns ``(res, plans, weights)``, ``res`` with that stride settled."""
    from tqdm.auto import tqdm

    inv_freq = model.model.rotary_emb.inv_freq.detach().double().cpu()

    def plan_all(res):
        plans, weights = [], []
        for li, layer in enumerate(tqdm(model.model.layers, desc="mla: plan layers", disable=not progress, leave=False)):
            w = layer_weights(layer.self_attn, res.n_kv)
            plans.append(factorisation(plan_layer(w, Cs[li], mus[li], res, inv_freq, p_deltas[li]), w, Cs[li], res))
            weights.append(w)
        return res, plans, weights

    ucfg = res.config
    if ucfg.rope_selection != "geometric" or ucfg.rope_stride is not None:
        return plan_all(res)
    with_stride = lambda c: replace(res, config=replace(ucfg, rope_stride=c))  # noqa: E731
    first = plan_all(with_stride(1))
    best = ops.best_rope_stride([p.score for p in first[1]], ucfg.qk_rope_head_dim // 2)
    return first if best == 1 else plan_all(with_stride(best))


def upcycle_to_mla(model, config: UpcycleConfig | None = None, calib_ids: torch.Tensor | None = None,
                   calib_window: int = 512, progress: bool = True):
    """Upcycle a Llama-family causal LM to ``MLAForCausalLM`` (training-free). Returns ``(mla, report)``.
    ``config`` is read, never changed; the report gives the settings it resolved to.

    Example:
        >>> from hf_ext.mla import upcycle_to_mla, UpcycleConfig
        >>> mla, report = upcycle_to_mla(model, UpcycleConfig(kv_ratio=6.4), calib_ids=ids)  # doctest: +SKIP
        >>> report["kv_ratio"]                                                               # doctest: +SKIP
        6.4
    """
    ucfg = config or UpcycleConfig(kv_ratio=6.4)
    validate_upcycle(model, ucfg)
    res = resolve_upcycle(model, ucfg)
    t0 = time.perf_counter()
    Cs, mus, p_deltas, n_calib = _calibrate(model, res, calib_ids, calib_window, progress)
    res, plans, weights = _plan_model(model, res, Cs, mus, p_deltas, progress)
    r = res.config.kv_lora_rank
    if r is None:
        r = min(max(ops.rank_for_energy(p.evals, res.config.energy) for p in plans), res.max_rank)
    active_norm = res.config.target == "deepseek_v3" and res.config.latent_norm_init == "gain"
    mcfg = _mla_config(model, res, plans, weights, r, active_norm)
    mla = MLAForCausalLM(mcfg).to(next(model.parameters()).dtype)
    _copy_body(model, mla)
    energy = []
    for li, (p, w) in enumerate(zip(plans, weights)):
        energy.append(_fill_attention(mla.model.layers[li].self_attn, p, w, r, res))
        if active_norm:
            fill_deepseek_latents(mla.model.layers[li], model.model.layers[li].input_layernorm.weight, p.C)
    mla.generation_config = model.generation_config
    return mla.eval(), _report(model, mla, res, r, energy, n_calib, t0)


def _mla_config(model, res: Resolved, plans: list[LayerPlan], weights, r: int, active_norm: bool) -> MLAConfig:
    """The source's config with the latent's shapes and every layer's kept RoPE pairs."""
    cfg, ucfg, D = model.config, res.config, res.D
    mcfg = MLAConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=res.H, num_key_value_heads=res.n_kv, head_dim=D,
        kv_lora_rank=r, qk_nope_head_dim=min(len(plans[0].nope_idx), r),
        qk_rope_head_dim=ucfg.qk_rope_head_dim, v_head_dim=D, rope_key_sharing=ucfg.rope_key_sharing,
        q_lora_rank=cfg.hidden_size if active_norm else None, latent_norm=active_norm,
        rope_freq_index=[[[i for i, _ in head] for head in p.comps] for p in plans], qk_norm=res.qk_norm,
        rope_head_index=[[[j for _, j in head] for head in p.comps] for p in plans] if res.qk_norm else None,
        softmax_scale=getattr(model.model.layers[0].self_attn, "scaling", D ** -0.5),
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=DEEPSEEK_LATENT_EPS if ucfg.target == "deepseek_v3" else cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters),
        attention_bias=any(wt["bq"] is not None or wt["bk"] is not None for wt in weights),
        o_proj_bias=any(wt["bv"] is not None or wt["bo"] is not None for wt in weights),
        mlp_bias=getattr(cfg, "mlp_bias", False), sliding_window=getattr(cfg, "sliding_window", None) if
        getattr(cfg, "use_sliding_window", True) else None, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, tie_word_embeddings=cfg.tie_word_embeddings)
    mcfg._attn_implementation = cfg._attn_implementation
    return mcfg


def _report(model, mla, res: Resolved, r: int, energy: list[float], n_calib: int, t0: float) -> dict:
    """What was made and measured: cache sizes, the resolved settings, energy kept, parameters, seconds."""
    ucfg, src_values = res.config, 2 * res.n_kv * res.D
    kv_values = mla.config.kv_values_per_token
    return {"kv_values_per_token_source": src_values, "kv_values_per_token": kv_values,
            "kv_ratio": src_values / kv_values, "kv_lora_rank": r,
            "qk_rope_head_dim": ucfg.qk_rope_head_dim, "rope_key_sharing": ucfg.rope_key_sharing,
            "rope_rotation": ucfg.rope_rotation, "rope_selection": ucfg.rope_selection, "kv_init": ucfg.kv_init,
            "nope_rotation": ucfg.nope_rotation, "target": ucfg.target,
            **({"rope_stride": ucfg.rope_stride} if ucfg.rope_selection == "geometric" else {}),
            **({"latent_norm_init": ucfg.latent_norm_init} if ucfg.target == "deepseek_v3" else {}),
            "calib_tokens": n_calib, "energy_kept_min": min(energy), "energy_kept_mean": sum(energy) / len(energy),
            "params_source": sum(t.numel() for t in model.parameters()),
            "params_mla": sum(t.numel() for t in mla.parameters()), "seconds": time.perf_counter() - t0}


def _copy_body(src, dst):
    """Everything but attention is copied as is (embeddings, norms, MLPs, head)."""
    sd = {k: v for k, v in src.state_dict().items() if ".self_attn." not in k}
    missing, unexpected = dst.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(".self_attn." in k or k == "lm_head.weight" for k in missing), missing


@torch.no_grad()
def _fill_attention(attn, p: LayerPlan, w, r: int, res: Resolved) -> float:
    """Write one layer's MLA weights from its plan. Returns the fraction of weighted energy kept."""
    H, n_kv, D, d_r = res.H, res.n_kv, res.D, res.config.qk_rope_head_dim
    F = len(p.nope_idx)
    W_up, W_down, evals = ops.weighted_lowrank(p.M, p.C, r, p.Dw)           # (F+n_kv*D, r), (r, h)
    U_k, U_v = W_up[:F], W_up[F:]                                           # (F, r), (n_kv*D, r)
    if F > r:   # fold W_UK's column space into the query: q.(U_k c) = (Q^T q).(R c), exact
        Qb, W_uk = torch.linalg.qr(U_k)                                     # (F, r), (r, r)
    else:
        Qb, W_uk = torch.eye(F, dtype=torch.float64), U_k                   # (F, F), (F, r)
    hidden = w["Wq"].shape[1]
    Wq_heads = w["Wq"].view(H, D, hidden)
    bq_heads = None if w["bq"] is None else w["bq"].view(H, D)
    q_rows, q_bias, kb_rows = [], [], []
    for h in range(H):
        g = int(p.g_of[h])
        G_h = p.G[h]                                                        # (n_kv*D, D) rotated slot of head h
        q_nope = Qb.T @ G_h[p.nope_idx]                                     # (d_n, D) applied to q_h
        q_rope = G_h[ops.rope_head_rows(p.comps[0 if len(p.comps) == 1 else g], D)]  # (d_r, D)
        A = torch.cat([q_nope, q_rope], 0)                                  # (d_n + d_r, D)
        q_rows.append(A if w["gq"] is not None else A @ Wq_heads[h])       # qk_norm: A maps the normed q_h
        if bq_heads is not None and w["gq"] is None:
            q_bias.append(A @ bq_heads[h])
        kb_rows.append(torch.cat([W_uk, U_v[g * D:(g + 1) * D]], 0))       # (d_n + D, r)
    attn_q = torch.cat(q_rows, 0)
    rope_k_rows = torch.cat([p.Wk_rot[ops.rope_head_rows(hd, D)] for hd in p.comps], 0)  # (n_rope*d_r, h)
    dt = attn.o_proj.weight.dtype
    if w["gq"] is not None:  # qk_norm: the source query path, then the per-head map; the source keys' RMS
        attn.q_head_proj.copy_(torch.stack(q_rows).to(dt))                  # (H, d_n + d_r, D)
        attn.q_norm.weight.copy_(w["gq"].to(dt))
        attn.k_proj.weight.copy_(w["Wk_src"].to(dt))
        attn_q, q_bias = w["Wq"], [] if w["bq"] is None else [w["bq"]]
    (attn.q_proj if hasattr(attn, "q_proj") else attn.q_b_proj).weight.copy_(attn_q.to(dt))
    attn.kv_a_proj.weight.copy_(torch.cat([W_down, rope_k_rows], 0).to(dt))
    attn.kv_b_proj.weight.copy_(torch.cat(kb_rows, 0).to(dt))
    attn.o_proj.weight.copy_(w["Wo"].to(dt))
    if hasattr(attn, "q_proj") and attn.q_proj.bias is not None:
        attn.q_proj.bias.copy_(torch.cat(q_bias).to(dt) if q_bias else torch.zeros_like(attn.q_proj.bias))
    if attn.kv_a_proj.bias is not None:
        kb = torch.zeros(r + len(p.comps) * d_r, dtype=torch.float64)
        if p.bk_rot is not None:
            kb[r:] = torch.cat([p.bk_rot[ops.rope_head_rows(hd, D)] for hd in p.comps])
        attn.kv_a_proj.bias.copy_(kb.to(dt))
    if attn.o_proj.bias is not None:
        bo = torch.zeros(w["Wo"].shape[0], dtype=torch.float64) if w["bo"] is None else w["bo"].clone()
        if w["bv"] is not None:  # sum_s a_s (v_s + b) = sum_s a_s v_s + b, so b_v moves through W_O
            bo += w["Wo"] @ w["bv"].view(n_kv, D)[p.g_of].flatten()
        attn.o_proj.bias.copy_(bo.to(dt))
    return float(evals[:r].sum() / evals.sum().clamp_min(1e-30))
