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
from dataclasses import asdict, dataclass

import torch

from ..errors import HfExtError
from . import ops
from .calibration import attention_distances, collect_stats
from .configuration_mla import MLAConfig
from .export import DEEPSEEK_LATENT_EPS, check_deepseek_source, fill_deepseek_latents
from .modeling_mla import MLAForCausalLM

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
MIN_CALIB_TOKENS_PER_HIDDEN = 2  # C = E[x x^T] needs well over `hidden` samples to be full rank


class UpcycleError(HfExtError, ValueError):
    pass


@dataclass
class UpcycleConfig:
    """How to upcycle. Give exactly one of ``kv_lora_rank``, ``kv_ratio`` or ``energy``.

    The defaults were chosen at 6.4x on SmolLM2-135M by perplexity on a validation slice of
    python-docs:train (never on the eval split); see benchmarks/mla.py for the comparison.

    Args:
        kv_lora_rank: width r of the cached latent.
        kv_ratio: target KV-cache compression vs the source (2*n_kv*head_dim values per token); r follows.
        energy: keep the smallest r (max over layers) whose factorisation keeps this fraction of energy.
        qk_rope_head_dim: width of each decoupled RoPE key (even).
        rope_key_sharing: "shared" (one RoPE key, DeepSeek / X-EcoMLA) or "per_kv_head" (MHA2MLA).
        rope_rotation: "rorope" (TransMLA's PCA across heads per frequency; shared keys only), "none", or
            "auto": rorope where it applies (shared keys, no per-head q/k norm), else none.
        rope_selection: "qk_freq", "2norm" or "high_freq" (see the module docstring).
        kv_init: "qo_whitened", "whitened" or "svd".
        nope_rotation: "mean" replaces the rotation of every pair that leaves RoPE by its expectation over
            the attention distances measured on calibration text (``ops.mean_rotation``); "none" drops it.
        key_weight: weight of key (logit) errors relative to value (output) errors in the joint
            factorisation, after both blocks are scaled to equal energy.
        rope_horizon: without measured distances, ``qk_freq`` weighs rotations uniformly over this many tokens.
        rope_stride: ``geometric`` selection's stride c; None chooses it.
        target: ``"hf_ext"`` (our ``MLAForCausalLM`` layout) or ``"deepseek_v3"``: the layout that
            ``export_deepseek_v3`` writes as a stock DeepSeek-V3 checkpoint (one shared RoPE key with
            geometric frequencies, RMSNorm epsilon 1e-6; see ``hf_ext.mla.export``).
        latent_norm_init: with ``target="deepseek_v3"``, DeepSeek's KV latent RMSNorm: ``"identity"`` (default:
            the model has no latent norms and trains without them; the export folds in norms that are the
            identity, ``export.identity_latents``) or ``"gain"`` (the model has the norms and a query latent,
            the KV norm active with the calibrated RMS of c_kv as its gain: every token's K and V are rescaled
            by E[rms(c)] / rms(c_t); distillation anneals it in from the identity, ``DistillConfig.norm_anneal``).
            After the same distillation, "identity" measures 1.31x better (benchmarks/mla_deepseek_cost.py).
    """

    kv_lora_rank: int | None = None
    kv_ratio: float | None = None
    energy: float | None = None
    qk_rope_head_dim: int = 24
    rope_key_sharing: str = "shared"
    rope_rotation: str = "auto"
    rope_selection: str = "qk_freq"
    kv_init: str = "qo_whitened"
    nope_rotation: str = "mean"
    key_weight: float = 4.0
    rope_horizon: int = 2048
    rope_stride: int | None = None
    target: str = "hf_ext"
    latent_norm_init: str = "identity"

    @classmethod
    def lossless(cls, source_config) -> "UpcycleConfig":
        """Every RoPE dim kept per KV head, full rank: the MLA model equals the source."""
        D, n_kv = _head_dim(source_config), source_config.num_key_value_heads
        return cls(kv_lora_rank=n_kv * D, qk_rope_head_dim=D, rope_key_sharing="per_kv_head",
                   rope_rotation="none", rope_selection="high_freq", kv_init="svd", nope_rotation="none")

    def needs_calibration(self) -> bool:
        return (self.kv_init != "svd" or self.rope_selection != "high_freq" or self.rope_rotation != "none"
                or self.nope_rotation != "none")


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _has_qk_norm(model) -> bool:
    return hasattr(model.model.layers[0].self_attn, "k_norm")


def _check(model, ucfg: UpcycleConfig):
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise UpcycleError(f"model type '{cfg.model_type}' is not supported for MLA upcycling; "
                           f"supported: {', '.join(SUPPORTED)}")
    qk_norm = _has_qk_norm(model)
    if ucfg.rope_rotation == "auto":
        ucfg.rope_rotation = "rorope" if ucfg.rope_key_sharing == "shared" and not qk_norm else "none"
    for name, allowed in [("rope_key_sharing", ("shared", "per_kv_head")), ("rope_rotation", ("rorope", "none")),
                          ("rope_selection", ("qk_freq", "2norm", "high_freq", "geometric")),
                          ("kv_init", ("qo_whitened", "whitened", "svd")), ("nope_rotation", ("mean", "none"))]:
        if getattr(ucfg, name) not in allowed:
            raise UpcycleError(f"{name}={getattr(ucfg, name)!r}; choose one of {', '.join(allowed)}")
    if ucfg.target not in ("hf_ext", "deepseek_v3"):
        raise UpcycleError(f"target={ucfg.target!r}; choose 'hf_ext' or 'deepseek_v3'")
    if ucfg.target == "deepseek_v3":
        check_deepseek_source(model, ucfg, qk_norm)
    if sum(x is not None for x in (ucfg.kv_lora_rank, ucfg.kv_ratio, ucfg.energy)) != 1:
        raise UpcycleError("give exactly one of kv_lora_rank, kv_ratio or energy")
    D, n_kv = _head_dim(cfg), cfg.num_key_value_heads
    d_r = ucfg.qk_rope_head_dim
    if d_r % 2 or not 0 < d_r <= D:
        raise UpcycleError(f"qk_rope_head_dim={d_r}: RoPE rotates pairs, use an even width in 2..{D}")
    if ucfg.rope_rotation == "rorope" and ucfg.rope_key_sharing != "shared":
        raise UpcycleError("rope_rotation='rorope' mixes KV heads into one shared RoPE key; use it with "
                           "rope_key_sharing='shared', or rope_rotation='none'")
    if qk_norm and ucfg.rope_rotation == "rorope":
        raise UpcycleError("rope_rotation='rorope' mixes KV heads, but this model normalises each key head "
                           "on its own (qk_norm); use rope_rotation='none' (or 'auto')")
    if qk_norm and model.model.layers[0].self_attn.k_proj.bias is not None:
        raise UpcycleError("a key bias before a per-head key norm (qk_norm) is not supported; "
                           "supported qk_norm sources have attention_bias=False (Qwen3)")
    n_rope = 1 if ucfg.rope_key_sharing == "shared" else n_kv
    src_values = 2 * n_kv * D
    side = n_rope * d_r + (n_kv if qk_norm else 0)  # cached next to the latent: RoPE keys (+ key scales)
    max_rank = min(src_values - n_rope * d_r, cfg.hidden_size)  # rows of [K_nope; V], or the input width
    if ucfg.kv_ratio is not None:
        if ucfg.kv_ratio <= 1:
            raise UpcycleError(f"kv_ratio={ucfg.kv_ratio} does not compress; use a ratio above 1 (e.g. 6.4)")
        r = round(src_values / ucfg.kv_ratio) - side
        if r < 1:
            raise UpcycleError(f"kv_ratio={ucfg.kv_ratio} leaves no room for a latent next to {side} cached "
                               f"RoPE-key{' and key-scale' if qk_norm else ''} values; lower kv_ratio or qk_rope_head_dim")
        ucfg.kv_lora_rank = r
    if ucfg.kv_lora_rank is not None and not 0 < ucfg.kv_lora_rank <= max_rank:
        raise UpcycleError(f"kv_lora_rank={ucfg.kv_lora_rank} is above the maximum {max_rank} "
                           f"(min(2*n_kv*head_dim - RoPE dims, hidden_size)); lower it")
    if ucfg.energy is not None and not 0 < ucfg.energy <= 1:
        raise UpcycleError(f"energy={ucfg.energy}; give a fraction in (0, 1]")
    return D, n_kv, n_rope, max_rank, qk_norm


def _layer_weights(attn, H, n_kv, D):
    f64 = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    w = dict(Wq=f64(attn.q_proj.weight), bq=f64(attn.q_proj.bias), Wk=f64(attn.k_proj.weight),
             bk=f64(attn.k_proj.bias), Wv=f64(attn.v_proj.weight), bv=f64(attn.v_proj.bias),
             Wo=f64(attn.o_proj.weight), bo=f64(attn.o_proj.bias), gq=None, gk=None)
    if hasattr(attn, "k_norm"):  # qk_norm: the source key to keep for its RMS, and both norms' gammas
        w.update(Wk_src=w["Wk"], gq=f64(attn.q_norm.weight), gk=f64(attn.k_norm.weight))
        w["Wk"] = w["gk"].repeat(n_kv)[:, None] * w["Wk"]  # targets are gamma . k; s_g is applied at run time
    return w


def _plan_layer(w, C, mu, ucfg, H, n_kv, D, inv_freq, p_delta=None):
    """Rotation, RoPE selection and the stacked [K_nope; V] matrix of one layer (no rank chosen yet)."""
    g_of = torch.arange(H) // (H // n_kv)                                   # KV head of each query head
    half, d_r = D // 2, ucfg.qk_rope_head_dim
    K = _moment(w["Wk"], w["bk"], C, mu)
    Q = _moment(w["Wq"], w["bq"], C, mu)
    key_scale = None
    if w["gq"] is not None:  # qk_norm: moments of the normalised heads, gamma . y * sqrt(D / E|y_g|^2)
        key_scale = _inv_rms(w["Wk_src"], None, C, mu, n_kv, D)                # (n_kv*D,)
        q_scale = _inv_rms(w["Wq"], w["bq"], C, mu, H, D) * w["gq"].repeat(H)   # (H*D,)
        K, Q = K * torch.outer(key_scale, key_scale), Q * torch.outer(q_scale, q_scale)
    if p_delta is not None:
        c, s_ = ops.mean_rotation(inv_freq, p_delta)                         # (half,), (half,)
    if ucfg.rope_rotation == "rorope":
        R, k_energy = ops.rorope_rotation(K, n_kv, D)                        # (half, n_kv, n_kv), (half, n_kv)
    else:
        R = torch.eye(n_kv, dtype=torch.float64).expand(half, n_kv, n_kv).clone()
        k_energy = _pair_energy(K, n_kv, D)                                   # (half, n_kv)
    T = ops.rotation_matrix(R, n_kv, D)                                      # (n_kv*D, n_kv*D)
    q_pair = _pair_energy(Q, H, D)                                           # (half, H)
    # q energy of component (i, j): sum over heads of R[i, j, g(h)]^2 * E|q_{h,i}|^2
    q_comp = torch.einsum("ijh,ih->ijh", R[:, :, g_of] ** 2, q_pair)          # (half, n_kv, H)
    two_norm = (q_comp.sqrt().sum(-1)) * k_energy.sqrt()                     # (half, n_kv)
    if ucfg.rope_selection == "high_freq":
        score = -torch.arange(half, dtype=torch.float64)[:, None] * 1e6 + k_energy  # fastest first, then energy
    elif ucfg.rope_selection == "2norm":
        score = two_norm
    elif p_delta is not None:  # rotation variance under the measured attention distances
        score = two_norm * (1 - c ** 2 - s_ ** 2).clamp_min(0).sqrt()[:, None]
    else:
        score = two_norm * ops.rope_sensitivity(inv_freq, ucfg.rope_horizon)[:, None]
    if ucfg.rope_selection == "geometric":   # frequencies 0, c, 2c, ...: the best component of each
        comps = [[(i, int(score[i].argmax())) for i in range(0, ucfg.rope_stride * (d_r // 2), ucfg.rope_stride)]]
    elif ucfg.rope_key_sharing == "shared":
        top = score.flatten().argsort(descending=True)[: d_r // 2]
        comps = [sorted(((int(t) // n_kv, int(t) % n_kv) for t in top))]    # one RoPE head: [(i, j)]
    else:
        comps = [sorted((int(i), g) for i in score[:, g].argsort(descending=True)[: d_r // 2]) for g in range(n_kv)]
    rope_rows = {(j * D + d) for head in comps for i, j in head for d in ops.pair_rows(i, D)}
    nope_idx = torch.tensor([k for k in range(n_kv * D) if k not in rope_rows], dtype=torch.long)
    Wk_rot = T @ w["Wk"]                                                     # (n_kv*D, h) rotated keys
    bk_rot = None if w["bk"] is None else T @ w["bk"]
    M = torch.cat([Wk_rot[nope_idx], w["Wv"]], 0)                           # (F + n_kv*D, h)
    # Query of head h in the rotated key space: G_h (n_kv*D, D) = T[:, slot g(h)]
    G = torch.stack([T[:, g * D:(g + 1) * D] for g in g_of.tolist()])      # (H, n_kv*D, D)
    if ucfg.nope_rotation == "mean" and p_delta is not None:
        rope_pairs = {(i, j) for head in comps for i, j in head}
        for i in range(half):
            for j in range(n_kv):
                if (i, j) not in rope_pairs:
                    a, b = j * D + i, j * D + i + half
                    G[:, a], G[:, b] = c[i] * G[:, a] - s_[i] * G[:, b], s_[i] * G[:, a] + c[i] * G[:, b]
    return dict(R=R, T=T, comps=comps, nope_idx=nope_idx, Wk_rot=Wk_rot, bk_rot=bk_rot, M=M, G=G, Q=Q, g_of=g_of,
                key_scale=key_scale, score=score)


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


def _row_weight(plan, w, C, ucfg, H, n_kv, D):
    """Dw for weighted_lowrank: None (svd), block balance (whitened) or query/W_O aware (qo_whitened)."""
    F = len(plan["nope_idx"])
    if ucfg.kv_init == "svd":
        return None
    Mk, Mv = plan["M"][:F], plan["M"][F:]
    if ucfg.kv_init == "whitened":
        Ak, Av = torch.eye(F, dtype=torch.float64), torch.eye(n_kv * D, dtype=torch.float64)
    else:
        Qh = plan["Q"].view(H, D, H, D).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (H, D, D) per-head E[q q^T]
        Gn = plan["G"][:, plan["nope_idx"]]                                   # (H, F, D)
        Ak = ops.psd_sqrt(torch.einsum("hfd,hde,hge->fg", Gn, Qh, Gn)) if F else torch.zeros(0, 0, dtype=torch.float64)
        Wo = w["Wo"].view(-1, H, D).permute(1, 2, 0)                          # (H, D, hidden): W_O of head h
        Av = torch.block_diag(*[ops.psd_sqrt(sum(Wo[h] @ Wo[h].T for h in range(H) if plan["g_of"][h] == g))
                                for g in range(n_kv)])
    if plan["key_scale"] is not None:  # qk_norm: a key error is scaled by s_g like the key itself
        Ak = Ak * plan["key_scale"][plan["nope_idx"]][None]
    ek = (Ak @ Mk @ C @ Mk.T @ Ak.T).trace() if F else torch.tensor(1.0)
    ev = (Av @ Mv @ C @ Mv.T @ Av.T).trace()
    # Balance: each block carries the same weighted energy, so neither K nor V starves the other.
    return torch.block_diag(Ak * (ucfg.key_weight / ek).sqrt().clamp_min(1e-30), Av / ev.sqrt().clamp_min(1e-30))


def upcycle_to_mla(model, config: UpcycleConfig | None = None, calib_ids: torch.Tensor | None = None,
                   calib_window: int = 512, progress: bool = True):
    """Upcycle a Llama-family causal LM to ``MLAForCausalLM`` (training-free). Returns ``(mla, report)``.

    Example:
        >>> from hf_ext.mla import upcycle_to_mla, UpcycleConfig
        >>> mla, report = upcycle_to_mla(model, UpcycleConfig(kv_ratio=6.4), calib_ids=ids)  # doctest: +SKIP
        >>> report["kv_ratio"]                                                               # doctest: +SKIP
        6.4
    """
    from tqdm.auto import tqdm

    ucfg = UpcycleConfig(**asdict(config or UpcycleConfig(kv_ratio=6.4)))
    D, n_kv, n_rope, max_rank, qk_norm = _check(model, ucfg)
    cfg = model.config
    H, h, L = cfg.num_attention_heads, cfg.hidden_size, cfg.num_hidden_layers
    t0 = time.perf_counter()
    if ucfg.needs_calibration():
        need = MIN_CALIB_TOKENS_PER_HIDDEN * h
        if calib_ids is None or calib_ids.numel() < need:
            got = 0 if calib_ids is None else calib_ids.numel()
            raise UpcycleError(f"calibration text gives {got} tokens; this model needs at least {need} "
                               f"({MIN_CALIB_TOKENS_PER_HIDDEN} x hidden size {h}); give more --calib-text")
        Cs, mus, n_calib = collect_stats(model, calib_ids, calib_window, progress)
        p_deltas = attention_distances(model, calib_ids, calib_window, progress=progress)
    else:
        Cs, mus, n_calib, p_deltas = [None] * L, [None] * L, 0, [None] * L
    inv_freq = model.model.rotary_emb.inv_freq.detach().double().cpu()

    def plan_all():
        plans, weights = [], []
        for li, layer in enumerate(tqdm(model.model.layers, desc="mla: plan layers", disable=not progress, leave=False)):
            w = _layer_weights(layer.self_attn, H, n_kv, D)
            C = Cs[li] if Cs[li] is not None else torch.eye(h, dtype=torch.float64)
            plan = _plan_layer(w, Cs[li], mus[li], ucfg, H, n_kv, D, inv_freq, p_deltas[li])
            plan["Dw"] = _row_weight(plan, w, C, ucfg, H, n_kv, D)
            plan["C"] = None if ucfg.kv_init == "svd" else C
            Y = plan["M"] if plan["Dw"] is None else plan["Dw"] @ plan["M"]
            S = Y @ Y.T if plan["C"] is None else Y @ plan["C"] @ Y.T
            plan["evals"] = torch.linalg.eigvalsh((S + S.T) / 2).flip(0).clamp_min(0)
            plans.append(plan)
            weights.append(w)
        return plans, weights

    stride_given = ucfg.rope_stride is not None
    if ucfg.rope_selection == "geometric" and not stride_given:
        ucfg.rope_stride = 1
    plans, weights = plan_all()
    if ucfg.rope_selection == "geometric" and not stride_given:
        best = ops.best_rope_stride([p["score"] for p in plans], ucfg.qk_rope_head_dim // 2)
        if best != ucfg.rope_stride:
            ucfg.rope_stride = best
            plans, weights = plan_all()
    r = ucfg.kv_lora_rank
    if r is None:
        r = min(max(ops.rank_for_energy(p["evals"], ucfg.energy) for p in plans), max_rank)
    F = len(plans[0]["nope_idx"])
    d_n = min(F, r)
    active_norm = ucfg.target == "deepseek_v3" and ucfg.latent_norm_init == "gain"
    mcfg = MLAConfig(
        vocab_size=cfg.vocab_size, hidden_size=h, intermediate_size=cfg.intermediate_size, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=n_kv, head_dim=D, kv_lora_rank=r, qk_nope_head_dim=d_n,
        qk_rope_head_dim=ucfg.qk_rope_head_dim, v_head_dim=D, rope_key_sharing=ucfg.rope_key_sharing,
        q_lora_rank=h if active_norm else None, latent_norm=active_norm,
        rope_freq_index=[[[i for i, _ in head] for head in p["comps"]] for p in plans], qk_norm=qk_norm,
        rope_head_index=[[[j for _, j in head] for head in p["comps"]] for p in plans] if qk_norm else None,
        softmax_scale=getattr(model.model.layers[0].self_attn, "scaling", D ** -0.5),
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=DEEPSEEK_LATENT_EPS if ucfg.target == "deepseek_v3" else cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters),
        attention_bias=any(wt["bq"] is not None or wt["bk"] is not None for wt in weights),
        o_proj_bias=any(wt["bv"] is not None or wt["bo"] is not None for wt in weights),
        mlp_bias=getattr(cfg, "mlp_bias", False), sliding_window=getattr(cfg, "sliding_window", None) if
        getattr(cfg, "use_sliding_window", True) else None, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, tie_word_embeddings=cfg.tie_word_embeddings)
    mcfg._attn_implementation = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    mla = MLAForCausalLM(mcfg).to(dtype)
    _copy_body(model, mla)
    energy = []
    for li, (p, w) in enumerate(zip(plans, weights)):
        energy.append(_fill_attention(mla.model.layers[li].self_attn, p, w, r, d_n, H, n_kv, D, ucfg))
        if active_norm:
            fill_deepseek_latents(mla.model.layers[li], model.model.layers[li].input_layernorm.weight, p["C"])
    mla.generation_config = model.generation_config
    src_values = 2 * n_kv * D
    report = {"kv_values_per_token_source": src_values, "kv_values_per_token": mcfg.kv_values_per_token,
              "kv_ratio": src_values / mcfg.kv_values_per_token, "kv_lora_rank": r,
              "qk_rope_head_dim": ucfg.qk_rope_head_dim, "rope_key_sharing": ucfg.rope_key_sharing,
              "rope_rotation": ucfg.rope_rotation, "rope_selection": ucfg.rope_selection, "kv_init": ucfg.kv_init,
              "nope_rotation": ucfg.nope_rotation, "target": ucfg.target,
              **({"rope_stride": ucfg.rope_stride} if ucfg.rope_selection == "geometric" else {}),
              **({"latent_norm_init": ucfg.latent_norm_init} if ucfg.target == "deepseek_v3" else {}),
              "calib_tokens": n_calib, "energy_kept_min": min(energy), "energy_kept_mean": sum(energy) / len(energy),
              "params_source": sum(t.numel() for t in model.parameters()),
              "params_mla": sum(t.numel() for t in mla.parameters()), "seconds": time.perf_counter() - t0}
    return mla.eval(), report


def _copy_body(src, dst):
    """Everything but attention is copied as is (embeddings, norms, MLPs, head)."""
    sd = {k: v for k, v in src.state_dict().items() if ".self_attn." not in k}
    missing, unexpected = dst.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(".self_attn." in k or k == "lm_head.weight" for k in missing), missing


@torch.no_grad()
def _fill_attention(attn, p, w, r, d_n, H, n_kv, D, ucfg) -> float:
    """Write one layer's MLA weights from its plan. Returns the fraction of weighted energy kept."""
    d_r = ucfg.qk_rope_head_dim
    F = len(p["nope_idx"])
    W_up, W_down, evals = ops.weighted_lowrank(p["M"], p["C"], r, p["Dw"])  # (F+n_kv*D, r), (r, h)
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
        g = int(p["g_of"][h])
        G_h = p["G"][h]                                                     # (n_kv*D, D) rotated slot of head h
        head_rope = p["comps"][0 if len(p["comps"]) == 1 else g]
        rope_rot_rows = [j * D + i for i, j in head_rope] + [j * D + i + D // 2 for i, j in head_rope]
        q_nope = Qb.T @ G_h[p["nope_idx"]]                                  # (d_n, D) applied to q_h
        q_rope = G_h[rope_rot_rows]                                         # (d_r, D)
        A = torch.cat([q_nope, q_rope], 0)                                  # (d_n + d_r, D)
        q_rows.append(A if w["gq"] is not None else A @ Wq_heads[h])       # qk_norm: A maps the normed q_h
        if bq_heads is not None and w["gq"] is None:
            q_bias.append(A @ bq_heads[h])
        kb_rows.append(torch.cat([W_uk, U_v[g * D:(g + 1) * D]], 0))       # (d_n + D, r)
    attn_q = torch.cat(q_rows, 0)
    rope_k_rows = torch.cat([p["Wk_rot"][[j * D + i for i, j in hd] + [j * D + i + D // 2 for i, j in hd]]
                             for hd in p["comps"]], 0)                      # (n_rope*d_r, h)
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
        kb = torch.zeros(r + len(p["comps"]) * d_r, dtype=torch.float64)
        if p["bk_rot"] is not None:
            kb[r:] = torch.cat([p["bk_rot"][[j * D + i for i, j in hd] + [j * D + i + D // 2 for i, j in hd]]
                                for hd in p["comps"]])
        attn.kv_a_proj.bias.copy_(kb.to(dt))
    if attn.o_proj.bias is not None:
        bo = torch.zeros(w["Wo"].shape[0], dtype=torch.float64) if w["bo"] is None else w["bo"].clone()
        if w["bv"] is not None:  # sum_s a_s (v_s + b) = sum_s a_s v_s + b, so b_v moves through W_O
            bo += w["Wo"] @ w["bv"].view(n_kv, D)[p["g_of"]].flatten()
        attn.o_proj.bias.copy_(bo.to(dt))
    return float(evals[:r].sum() / evals.sum().clamp_min(1e-30))
