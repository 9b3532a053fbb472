"""An MLA model as a stock DeepSeek-V3 checkpoint (``DeepseekV3ForCausalLM``), which transformers loads with
no remote code and llama.cpp's own converter (and, by format, vLLM and SGLang) runs with its latent cache.

DeepSeek-V3 fixes three things that our ``MLAForCausalLM`` leaves free, so a model must be made in that
form (``UpcycleConfig(target="deepseek_v3")``, then distilled if you like) before it exports exactly:
- **RoPE:** one shared RoPE key whose frequencies are inv_freq_j = theta'^(-2j/d_r), j < d_r/2, a geometric
  series from frequency 1. Our kept pairs must be every c-th source frequency from the fastest (source
  frequency index c*j), and then theta' = theta^(c * d_r / head_dim). DeepSeek's weights store each RoPE
  vector interleaved (x0, y0, x1, y1, ...) where ours are rotate-half (x0, x1, ..., y0, y1, ...), which is
  what ``rope_interleave=True`` and llama.cpp's "norm" RoPE expect; the export permutes those rows.
- **Latent norms:** RMSNorm on c_kv (``kv_a_layernorm``, epsilon 1e-6 in transformers, the config's
  ``rms_norm_eps`` in llama.cpp, so the export writes 1e-6 there) and on the query latent (``q_a_layernorm``).
  The KV norm is not linear. ``latent_norm_init="identity"`` (the default) never trains it: the model keeps
  no latent norms, and the export folds in norms that are the identity (``identity_latents``): c_kv is scaled
  down until the norm's epsilon dominates its denominator and the gain undoes the scale. Distilled
  without the norm, the model is 1.31x better than one that learns to live with it
  (benchmarks/results/mla_deepseek_cost.json). ``"gain"`` keeps an active norm in the model instead.
- **Query latent:** llama.cpp's deepseek2 loader needs ``q_lora_rank`` unless the model has 26 or 27 layers
  (it guesses the "lite" variant from the count). An exact one: with q_a = diag(1/g) and the query latent
  norm's gain g, where g is the attention input norm's gain, the latent is x/rms(x) (RMS 1), the norm
  returns g * x/rms(x), which is the attention input, and q_b is the old q_proj (``query_latent``).
The softmax scale (ours: the source's head_dim^-1/2; DeepSeek's: (d_nope + d_rope)^-1/2) folds into q_b.
Every MLP is dense (``first_k_dense_replace = num_hidden_layers``); the MoE fields only satisfy loaders.

Sources with no DeepSeek equivalent are refused by name: query/key/value/output biases (Qwen2), per-head
q/k norms (Qwen3), per-KV-head RoPE keys, sliding windows, MLP biases, RoPE scaling other than "default".

Example:
    >>> from hf_ext.mla import UpcycleConfig, upcycle_to_mla, save_deepseek_v3
    >>> mla, _ = upcycle_to_mla(model, UpcycleConfig(kv_ratio=6.4, target="deepseek_v3"), calib_ids=ids)  # doctest: +SKIP
    >>> save_deepseek_v3(mla, "out/smollm2-deepseek", tokenizer=tok)        # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("out/smollm2-deepseek")        # DeepseekV3ForCausalLM  # doctest: +SKIP
"""
from __future__ import annotations

import math
import os

import torch

from ..errors import HfExtError

FP16_MIN_NORMAL = 2.0 ** -14      # 1 / gain beyond 1 / this would overflow float16 weights (65504)
DEEPSEEK_LATENT_EPS = 1e-6        # transformers' DeepseekV3RMSNorm default, which kv_a_layernorm always gets
# identity_latents: the folded KV norm is the identity to IDENTITY_RHO / 2 relative for every possible token
# (a bound, not an average: measured tokens of SmolLM2 sit 10-50x below it), while every weight and
# activation stays a normal float16 number (see identity_latents for the arithmetic).
IDENTITY_RHO = 1e-3
INPUT_SCALE = 2.0 ** -10          # beta: the attention input's scale; rms(beta * y) ~ 3e-4, above f16 subnormals (6.1e-5)
Q_LATENT_MAX = 2.0 ** 14          # the largest query-latent weight 1 / (k * beta * g), with f16 headroom


class ExportError(HfExtError, ValueError):
    """A model or option with no DeepSeek-V3 equivalent; the message names it and the fix."""


# ------------------------------------------------------------------------------------------- upcycling side
ENGINE_ALIGN = 64     # llama.cpp's CPU f16 dot/axpy loops run 64 lanes per step on AVX512 (32 on AVX2)
Q8_0_BLOCK = 32       # a q8_0 KV cache quantises rows in blocks of 32; the value view (c_kv) must be whole blocks


def engine_latent_dims(source_config, min_ratio: float = 6.0, rope_dim: int = 32) -> tuple[int, int]:
    """(kv_lora_rank, qk_rope_head_dim) for a DeepSeek-V3 export that serving engines' kernels run well.

    A DeepSeek MLA cache row is [c_kv; k_rope]: llama.cpp's attention dots run over the row (``r + d_r``) and
    accumulate values over ``c_kv`` (``r``). Their f16 loops take 64 (AVX512) or 32 (AVX2) elements per step
    and finish the rest one scalar at a time (ggml-cpu's ``vec.h``), so a row of 60 (r 36 + d_r 24, 6.4x on
    SmolLM2) is all scalar on AVX512; the 64-wide rows are measured in ``benchmarks/results/llamacpp_shapes.json``.
    This picks the widest row that is a multiple of 64 and still ``min_ratio`` smaller than the source's K+V,
    with ``r`` a multiple of 32 (q8_0 cache blocks).

    Example: SmolLM2-135M caches 2 x 3 x 64 = 384 values per token per layer, so 384 / 6 = 64 = 32 + 32.
        >>> from types import SimpleNamespace as C
        >>> engine_latent_dims(C(num_key_value_heads=3, head_dim=64, hidden_size=576, num_attention_heads=9))
        (32, 32)
    """
    head_dim = getattr(source_config, "head_dim", None) or source_config.hidden_size // source_config.num_attention_heads
    values = 2 * source_config.num_key_value_heads * head_dim          # K + V values per token per layer
    row = int(values / min_ratio) // ENGINE_ALIGN * ENGINE_ALIGN
    r = row - rope_dim
    if row == 0 or r < Q8_0_BLOCK or r % Q8_0_BLOCK:
        raise ExportError(f"no cache row that is a multiple of {ENGINE_ALIGN} with a {rope_dim}-dim RoPE key is "
                          f"{min_ratio}x smaller than this source's {values} values per token; pass "
                          "--kv-lora-rank and --rope-dim yourself")
    return r, rope_dim


def check_deepseek_source(model, ucfg, qk_norm: bool) -> None:
    """Refuse a source (or option) that ``target="deepseek_v3"`` cannot express. Reads only: ``ucfg`` is left as given."""
    cfg, attn = model.config, model.model.layers[0].self_attn
    fix = "upcycle with target='hf_ext' (our MLAForCausalLM, loaded with trust_remote_code) instead"
    if qk_norm:
        raise ExportError(f"{cfg.model_type} normalises every query and key head (qk_norm); DeepSeek-V3 has no "
                          f"per-head norm, so its per-head key scale cannot be expressed: {fix}")
    biases = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(attn, n).bias is not None]
    if biases or getattr(cfg, "mlp_bias", False):
        raise ExportError(f"{cfg.model_type} has biases ({', '.join(biases) or 'mlp'}); DeepSeek-V3's attention "
                          f"and MLP projections have none: {fix}")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise ExportError(f"{cfg.model_type} uses a sliding window ({cfg.sliding_window}); DeepSeek-V3 attends to "
                          f"the whole context: {fix}, or load the source with sliding_window=None")
    if cfg.rope_parameters.get("rope_type", "default") != "default":
        raise ExportError(f"RoPE type {cfg.rope_parameters['rope_type']!r} is not supported by the DeepSeek-V3 "
                          f"export (only 'default'): {fix}")
    if ucfg.rope_key_sharing != "shared":
        raise ExportError("DeepSeek-V3 has one RoPE key shared by all heads; use rope_key_sharing='shared' "
                          f"with target='deepseek_v3' (per_kv_head keys: {fix})")
    if ucfg.rope_selection not in ("qk_freq", "high_freq", "geometric"):
        raise ExportError(f"rope_selection={ucfg.rope_selection!r} keeps pairs DeepSeek's RoPE cannot express; "
                          "use 'geometric' (every c-th frequency from the fastest) or 'high_freq'")
    if ucfg.latent_norm_init not in ("identity", "gain"):
        raise ExportError(f"latent_norm_init={ucfg.latent_norm_init!r}; choose 'identity' or 'gain'")


def deepseek_rope_selection(ucfg) -> tuple[str, int | None]:
    """``(rope_selection, rope_stride)`` that ``target="deepseek_v3"`` runs for ``ucfg`` (checked by
    ``check_deepseek_source``): always ``"geometric"``, the only sets DeepSeek's RoPE can express.
    ``"qk_freq"`` keeps its score under that constraint (stride as given, None: chosen later); ``"high_freq"``,
    the fastest pairs, is stride 1.

    Example:
        >>> deepseek_rope_selection(UpcycleConfig(kv_ratio=6.4, rope_selection="high_freq"))  # doctest: +SKIP
        ('geometric', 1)
    """
    return "geometric", 1 if ucfg.rope_selection == "high_freq" else ucfg.rope_stride


def query_latent(g: torch.Tensor, beta: float = 1.0, eps: float = DEEPSEEK_LATENT_EPS):
    """An exact query latent for an attention whose input is ``beta * g * x_hat`` (x_hat = x / rms(x), RMS 1):
    ``(q_a diagonal (h,), q_a_layernorm gain (h,), k)``. q_a = 1 / (k beta g) makes the latent x_hat / k, with
    k the smallest power of two that keeps every q_a weight <= Q_LATENT_MAX; its norm returns
    g x_hat sqrt(1 + eps k^2) / sqrt(1 + eps k^2) = g x_hat, the source's attention input, for q_b = q_proj.
    Gains under float16's smallest normal are raised to it (on the input norm too, see the callers)."""
    g = g.detach().double().cpu()
    g = torch.where(g.abs() < FP16_MIN_NORMAL, torch.full_like(g, FP16_MIN_NORMAL).copysign(g), g)
    k = 2.0 ** max(0, math.ceil(math.log2(1 / (beta * float(g.abs().min()) * Q_LATENT_MAX))))
    return 1 / (k * beta * g), g * math.sqrt(1 + eps * k * k), g


@torch.no_grad()
def fill_deepseek_latents(layer, input_norm_gain: torch.Tensor, C: torch.Tensor | None) -> None:
    """``latent_norm_init="gain"``: set one MLA layer's exact query latent (``query_latent``) and an *active*
    KV latent norm whose gain is E[rms(c_kv)] ~ sqrt(E|c|^2 / r), so a token of average latent size passes
    unchanged and the others are rescaled by E[rms] / rms(c_t). ``C`` (hidden, hidden) is E[y y^T] of the
    attention input y (None: white inputs)."""
    attn = layer.self_attn
    dt = attn.o_proj.weight.dtype
    q_a, q_gain, g = query_latent(input_norm_gain)
    attn.q_a_proj.weight.copy_(torch.diag(q_a).to(dt))                      # (h, h): y -> x / rms(x)
    attn.q_a_layernorm.weight.copy_(q_gain.to(dt))
    layer.input_layernorm.weight.copy_(g.to(dt))                            # the clamp, if any, on both sides
    W = attn.kv_a_proj.weight[:attn.r].double()                             # (r, h) c_kv = W y
    power = float((W @ (C if C is not None else torch.eye(W.shape[1], dtype=W.dtype)) @ W.T).trace() / attn.r)
    attn.kv_a_layernorm.weight.fill_(math.sqrt(power))


@torch.no_grad()
def identity_latents(sd: dict, prefix: str, r: int, rho: float = IDENTITY_RHO,
                     eps: float = DEEPSEEK_LATENT_EPS) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 latents equal to a layer with none (our ``latent_norm=False``), from its state dict ``sd``.

    The attention input becomes beta * y (input norm gain beta * g; beta = INPUT_SCALE), which the query latent
    undoes (``query_latent``) and the RoPE key rows (x 1/beta) too. The latent rows are scaled by alpha, so
    c' = alpha beta c, and the KV norm's gain sqrt(eps) / (alpha beta) gives
        n(c') = c (1 + ms(c') / eps)^-1/2 = c (1 - ms(c') / (2 eps) + ...).
    For every token, |c|^2 <= ||W_c diag(g)||_2^2 |x_hat|^2 = sigma^2 h, so alpha beta = sqrt(rho eps r / (sigma^2 h))
    keeps ms(c') / eps <= rho whatever the input. On SmolLM2 that is alpha beta ~ 3e-5: alpha * W ~ 2e-4 and
    beta * y ~ 1e-3, both normal float16 numbers (>= 6.1e-5), and c' is computed in float32 (llama.cpp's
    matmul output; transformers in float32 or bfloat16). In float16 *arithmetic* c' (~1e-5) is subnormal: serve
    such an export in bfloat16 or float32, not float16."""
    p = prefix
    g = sd[f"{p}input_layernorm.weight"].double()
    W = sd[f"{p}self_attn.kv_a_proj.weight"].double()                       # (r + d_r, h): [W_c; W_rope]
    beta = INPUT_SCALE
    q_a, q_gain, g = query_latent(g, beta, eps)
    sigma = float(torch.linalg.matrix_norm(W[:r] * g[None], 2))
    ab = math.sqrt(rho * eps * r / max(sigma ** 2 * g.numel(), 1e-300))    # alpha * beta
    dt = sd[f"{p}self_attn.kv_a_proj.weight"].dtype
    kv_a = torch.cat([W[:r] * (ab / beta), W[r:] / beta])
    return {f"{p}input_layernorm.weight": (beta * g).to(dt),
            f"{p}self_attn.q_a_proj.weight": torch.diag(q_a).to(dt),
            f"{p}self_attn.q_a_layernorm.weight": q_gain.to(dt),
            f"{p}self_attn.q_b_proj.weight": sd[f"{p}self_attn.q_proj.weight"],
            f"{p}self_attn.kv_a_proj.weight": kv_a.to(dt),
            f"{p}self_attn.kv_a_layernorm.weight": torch.full((r,), math.sqrt(eps) / ab, dtype=dt)}


@torch.no_grad()
def fold_identity_latents(mla, rho: float = IDENTITY_RHO):
    """The same model with DeepSeek's latents (``latent_norm=True``, a query latent of width hidden_size), set by
    ``identity_latents`` so that they compute what the model computed without them: a new ``MLAForCausalLM``.
    Every token's c_kv passes its norm scaled by a factor in [(1 + rho)^-1/2, 1]; the rest is exact.

    Example:
        >>> folded = fold_identity_latents(mla)            # what export_deepseek_v3 writes  # doctest: +SKIP
    """
    import copy

    cfg = mla.config
    if cfg.latent_norm:
        raise ExportError("this MLA model has latent norms already; export it as it is")
    new_cfg = copy.deepcopy(cfg)
    new_cfg.latent_norm, new_cfg.q_lora_rank = True, cfg.hidden_size
    state = dict(mla.state_dict())
    for i in range(cfg.num_hidden_layers):
        state.update(identity_latents(state, f"model.layers.{i}.", cfg.kv_lora_rank, rho, cfg.latent_norm_eps))
        del state[f"model.layers.{i}.self_attn.q_proj.weight"]
    folded = type(mla)(new_cfg).to(next(mla.parameters()).dtype)
    folded.load_state_dict(state, strict=True)
    folded.generation_config = mla.generation_config
    return folded.eval()


# ------------------------------------------------------------------------------------------------ export
def _interleave(n_rope_dims: int) -> torch.Tensor:
    """Row order taking a rotate-half RoPE vector (x0..x_{n-1}, y0..y_{n-1}) to (x0, y0, x1, y1, ...)."""
    half = n_rope_dims // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()


def rope_stride(config) -> int:
    """The common stride c of every layer's kept frequencies (0, c, 2c, ...); ExportError if there is none."""
    n = config.qk_rope_head_dim // 2
    layers = config.rope_freq_index or [[list(range(n))]] * config.num_hidden_layers
    strides = {idx[1] - idx[0] if n > 1 else 1 for layer in layers for idx in layer}
    if len(strides) != 1 or any(idx != [i * next(iter(strides)) for i in range(n)] for lay in layers for idx in lay):
        raise ExportError("this MLA model keeps RoPE frequencies that are not every c-th from the fastest with one c "
                          "for all layers, which DeepSeek's RoPE cannot express; upcycle it with "
                          "UpcycleConfig(target='deepseek_v3')")
    return next(iter(strides))


def check_exportable(config) -> None:
    fix = "upcycle it with UpcycleConfig(target='deepseek_v3')"
    if config.qk_norm or config.rope_key_sharing != "shared":
        raise ExportError(f"this MLA model has {'per-head key norms (qk_norm)' if config.qk_norm else 'per-KV-head RoPE keys'}"
                          f", which DeepSeek-V3 cannot express; keep it in the hf_ext format (--format hf_ext)")
    if not config.latent_norm and config.rms_norm_eps != DEEPSEEK_LATENT_EPS:
        raise ExportError(f"this MLA model has no latent norms, which the export folds in as identities in their "
                          f"epsilon regime; that needs the model's rms_norm_eps at DeepSeek's {DEEPSEEK_LATENT_EPS} "
                          f"(it is {config.rms_norm_eps}, and llama.cpp uses it for the latent norms); {fix}")
    if config.attention_bias or config.o_proj_bias or config.mlp_bias or config.sliding_window:
        raise ExportError(f"this MLA model has biases or a sliding window, which DeepSeek-V3 has not; {fix} from a "
                          "source without them, or keep the hf_ext format")
    if config.rope_parameters.get("rope_type", "default") != "default":
        raise ExportError("only RoPE type 'default' exports to DeepSeek-V3")
    rope_stride(config)


def deepseek_v3_config(config):
    """The ``DeepseekV3Config`` of an exportable ``MLAConfig``."""
    from transformers import DeepseekV3Config

    check_exportable(config)
    c, d_r = rope_stride(config), config.qk_rope_head_dim
    theta = config.rope_parameters["rope_theta"] ** (c * d_r / config.head_dim)
    return DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        # every MLP dense; llama.cpp's loader still wants n_routed_experts > n_group
        n_shared_experts=1, n_routed_experts=2, n_group=1, topk_group=1, num_experts_per_tok=1,
        first_k_dense_replace=config.num_hidden_layers, num_mtp_layers=0,
        kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank or config.hidden_size, qk_rope_head_dim=d_r,
        qk_nope_head_dim=config.qk_nope_head_dim, v_head_dim=config.v_head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, rope_interleave=True,
        attention_bias=False, tie_word_embeddings=False, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, architectures=["DeepseekV3ForCausalLM"])


@torch.no_grad()
def export_deepseek_v3(mla) -> tuple[object, dict[str, torch.Tensor]]:
    """``(DeepseekV3Config, state_dict)`` of an exportable ``MLAForCausalLM``: a pure key and row map.

    Exact: every tensor is a copy, a row permutation (RoPE interleave) or, for the query rows, a product
    with the power-of-two-free scale ratio (d_nope + d_rope)^1/2 * softmax_scale (1 when the head widths
    sum to the source's head_dim, as they do for SmolLM2 at 6.4x). A model without latent norms gets
    identity ones first (``fold_identity_latents``, which is exact to IDENTITY_RHO / 2 on c_kv at worst)."""
    if not mla.config.latent_norm:
        deepseek_v3_config(mla.config)                                      # refuse before folding
        mla = fold_identity_latents(mla)
    cfg = mla.config
    dcfg = deepseek_v3_config(cfg)
    H, d_n, d_r, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q_scale = cfg.softmax_scale * math.sqrt(d_n + d_r)                     # ours / DeepSeek's softmax scale
    q_perm = torch.cat([torch.arange(d_n), d_n + _interleave(d_r)])         # per head: nope, then interleaved rope
    q_rows = (torch.arange(H)[:, None] * (d_n + d_r) + q_perm).flatten()    # (H * (d_n + d_r),)
    kv_rows = torch.cat([torch.arange(r), r + _interleave(d_r)])            # latent, then interleaved rope
    sd = {}
    for k, v in mla.state_dict().items():
        v = v.detach().clone()
        if k.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            v = v[q_rows] * q_scale if q_scale != 1 else v[q_rows]
        elif k.endswith("self_attn.kv_a_proj.weight"):
            v, k = v[kv_rows], k.replace("kv_a_proj", "kv_a_proj_with_mqa")
        sd[k] = v
    if "lm_head.weight" not in sd or cfg.tie_word_embeddings:               # engines that do not tie read lm_head
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    return dcfg, sd


def save_deepseek_v3(mla, out: str | os.PathLike, tokenizer=None, card=None, overwrite: bool = False,
                     report: dict | None = None):
    """Write ``DeepseekV3ForCausalLM`` weights, config, tokenizer and card to ``out`` (atomically; no Python
    files, no auto_map). Returns the folder."""
    from transformers import DeepseekV3ForCausalLM

    from ..hub import save_converted

    dcfg, sd = export_deepseek_v3(mla)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(dcfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.generation_config = mla.generation_config
    return save_converted(model, out, tokenizer=tokenizer, card=card, overwrite=overwrite, report=report)
