"""An MLA model as a stock DeepSeek-V3 checkpoint (``DeepseekV3ForCausalLM``), which transformers loads with
no remote code and llama.cpp's own converter (and, by format, vLLM and SGLang) runs with its latent cache.

DeepSeek-V3 fixes three things that our ``MLAForCausalLM`` leaves free, so a model must be made in that
form (``UpcycleConfig(target="deepseek_v3")``, then distilled if you like) before it exports exactly:
- **RoPE:** one shared RoPE key whose frequencies are inv_freq_j = theta'^(-2j/d_r), j < d_r/2, a geometric
  series from frequency 1. Our kept pairs must be every c-th source frequency from the fastest (source
  frequency index c*j), and then theta' = theta^(c * d_r / head_dim). DeepSeek's weights store each RoPE
  vector interleaved (x0, y0, x1, y1, ...) where ours are rotate-half (x0, x1, ..., y0, y1, ...), which is
  what ``rope_interleave=True`` and llama.cpp's "norm" RoPE expect; the export permutes those rows.
- **Latent norms:** RMSNorm on c_kv (``kv_a_layernorm``, epsilon 1e-6 in transformers) and on the query
  latent (``q_a_layernorm``). Our ``latent_norm=True`` is the same computation. The KV norm is not linear,
  so a training-free upcycling loses to it; distillation (``hf_ext.mla.distill``) anneals it in from the
  identity by default (``hf_ext.mla.anneal``).
- **Query latent:** llama.cpp's deepseek2 loader needs ``q_lora_rank`` unless the model has 26 or 27 layers
  (it guesses the "lite" variant from the count). ``fill_deepseek_latents`` builds an exact one: with
  q_a = diag(1/g) and the query latent norm's gain g, where g is the attention input norm's gain, the latent
  is x/rms(x) (RMS 1), the norm returns g * x/rms(x), which is the attention input, and q_b is the old q_proj.
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
    """Refuse a source (or option) that ``target="deepseek_v3"`` cannot express; resolve the RoPE selection."""
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
    if ucfg.rope_selection == "qk_freq":           # the default score, constrained to what DeepSeek can express
        ucfg.rope_selection = "geometric"
    if ucfg.rope_selection == "high_freq":         # the fastest pairs are stride 1
        ucfg.rope_selection, ucfg.rope_stride = "geometric", 1
    if ucfg.rope_selection != "geometric":
        raise ExportError(f"rope_selection={ucfg.rope_selection!r} keeps pairs DeepSeek's RoPE cannot express; "
                          "use 'geometric' (every c-th frequency from the fastest) or 'high_freq'")
    if ucfg.latent_norm_init not in ("gain", "eps"):
        raise ExportError(f"latent_norm_init={ucfg.latent_norm_init!r}; choose 'gain' or 'eps'")


@torch.no_grad()
def fill_deepseek_latents(layer, input_norm_gain: torch.Tensor, C: torch.Tensor | None, init: str = "gain",
                          eps_error: float = 1e-6) -> None:
    """Set one MLA layer's query latent (exact, see the module docstring) and KV latent norm.

    ``C`` (hidden, hidden) is E[y y^T] of the attention input y (None: white inputs). ``init="gain"``: the
    KV norm's gain is E[rms(c_kv)] ~ sqrt(E|c|^2 / r), so a token of average latent size passes unchanged and
    the others are rescaled by E[rms] / rms(c_t). ``init="eps"``: c_kv is scaled by alpha so that the mean of
    (alpha c)^2 is ``2 * eps * eps_error``, where the norm is the identity to ~``eps_error`` relative, and the
    gain sqrt(eps) / alpha undoes the scale."""
    attn = layer.self_attn
    dt = attn.o_proj.weight.dtype
    g = input_norm_gain.detach().double().cpu()
    g = torch.where(g.abs() < FP16_MIN_NORMAL, torch.full_like(g, FP16_MIN_NORMAL).copysign(g), g)
    attn.q_a_proj.weight.copy_(torch.diag(1 / g).to(dt))                   # (h, h): y -> x / rms(x)
    attn.q_a_layernorm.weight.copy_(g.to(dt))
    layer.input_layernorm.weight.copy_(g.to(dt))                            # the clamp, if any, on both sides
    r = attn.r
    W = attn.kv_a_proj.weight[:r].double()                                  # (r, h) c_kv = W y
    power = float((W @ (C if C is not None else torch.eye(W.shape[1], dtype=W.dtype)) @ W.T).trace() / r)
    eps = attn.kv_a_layernorm.variance_epsilon
    if init == "gain":
        attn.kv_a_layernorm.weight.fill_(math.sqrt(power))
    else:
        alpha = math.sqrt(2 * eps * eps_error / max(power, 1e-300))
        attn.kv_a_proj.weight[:r] *= alpha
        attn.kv_a_layernorm.weight.fill_(math.sqrt(eps) / alpha)


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
    if not config.latent_norm:
        raise ExportError(f"DeepSeek-V3 always normalises the KV latent (kv_a_layernorm) and this MLA model does not "
                          f"(latent_norm=False), so no export is exact; {fix}")
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
        kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank, qk_rope_head_dim=d_r,
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
    sum to the source's head_dim, as they do for SmolLM2 at 6.4x)."""
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
