# Multi-head Latent Attention, upcycled from pretrained attention.
# Papers: X-EcoMLA (https://arxiv.org/abs/2503.11132), DeepSeek-V2 MLA (https://arxiv.org/abs/2405.04434),
#         MHA2MLA (https://arxiv.org/abs/2502.14837), TransMLA (https://arxiv.org/abs/2502.07864).
#
# Self-contained on purpose: only transformers/torch and the relative config import, so a checkpoint
# saved with auto_map loads with trust_remote_code=True on a machine without hf-ext.
"""MLAForCausalLM: a Llama-family body whose attention caches one latent per token.

Per layer and token the cache holds c_kv = W_DKV x (``kv_lora_rank`` values) and the decoupled RoPE
key(s) (``n_rope_heads * qk_rope_head_dim`` values), in ``MLALatentLayer``, a transformers cache layer
type that ``generate()`` builds from ``config.layer_types`` (``MLAStaticLatentLayer``, preallocated, with
``cache_implementation="static"``: the decode step then compiles in one graph with ``torch.compile``).
Sources that RMS-normalise each key head (``qk_norm``, Qwen3) also cache that per-head scale
(``num_key_value_heads`` values): it multiplies the position-free part of the keys, so it cannot be folded
into a latent shared with the values.

Two equivalent attention paths:
- expanded (prefill): K_nope and V are expanded from the cached latent by ``kv_b_proj``, and attention
  runs through transformers' ``ALL_ATTENTION_FUNCTIONS`` (eager / sdpa / flash).
- absorbed (decode): W_UK is folded into the query and W_UV into the output, so attention is MQA over
  [c_kv, k_rope] with values c_kv; no per-head K/V is ever materialised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_mla import MLAConfig


class MLALatentLayer(DynamicLayer):
    """Latent KV cache layer: ``keys`` holds c_kv (B, 1, T, r) [+ key scales, qk_norm], ``values`` the
    RoPE key (B, n_rope, T, d_r).

    Both grow along dim -2 like a DynamicLayer, so cropping, beam reordering and batch selection work
    unchanged; only ``r + n_rope * d_r`` values per token are stored instead of 2 * n_kv * head_dim.
    """

    _layer_type = "mla_latent"


class MLAStaticLatentLayer(StaticLayer):
    """The latent cache preallocated for ``max_cache_len`` tokens, for ``torch.compile`` and CUDA graphs.

    ``generate(..., cache_implementation="static")`` builds one per layer (transformers maps the layer type
    ``"mla_latent"`` to it). ``keys`` is c_kv (B, 1, L, r) [+ key scales], ``values`` the RoPE key
    (B, n_rope, L, d_r), written in place at the running position; slots past it are masked.
    """

    _layer_type = "mla_latent"

    def lazy_initialization(self, key_states, value_states):
        # StaticLayer gives keys and values one head count; the latent has 1 "head", the RoPE key n_rope
        super().lazy_initialization(key_states, key_states)
        self.values = value_states.new_zeros(*value_states.shape[:2], self.max_cache_len, value_states.shape[-1])
        self.v_head_dim = value_states.shape[-1]
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.values)


class MLARMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MLARotaryEmbedding(nn.Module):
    """The source model's RoPE frequencies (for its ``head_dim``); layers pick their kept pairs."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freq(config):
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](config)
        base, d = config.rope_parameters["rope_theta"], config.head_dim
        return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d)), 1.0

    @torch.no_grad()
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, head_dim/2)
        return (freqs.cos() * self.attention_scaling).to(x.dtype), (freqs.sin() * self.attention_scaling).to(x.dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE. x (B, n, T, d_r); cos/sin (B, n|1, T, d_r/2) for the pairs (k, k + d_r/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MLAAttention(nn.Module):
    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.n_rope = config.num_attention_heads, config.n_rope_heads
        self.r, self.d_n, self.d_r, self.d_v = (config.kv_lora_rank, config.qk_nope_head_dim,
                                                 config.qk_rope_head_dim, config.v_head_dim)
        self.scaling, self.is_causal = config.softmax_scale, True
        self.num_key_value_groups = 1  # the expanded path materialises one K/V head per query head
        self.attention_dropout = config.attention_dropout
        q_out = self.num_heads * (self.d_n + self.d_r)
        self.n_kv, D = config.num_key_value_heads, config.head_dim
        if config.qk_norm:  # q_h = RMSNorm(W_Q,h x) as in the source, then a per-head map to [q_nope; q_rope]
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * D, bias=config.attention_bias)
            self.q_norm = MLARMSNorm(D, eps=config.rms_norm_eps)
            self.q_head_proj = nn.Parameter(torch.empty(self.num_heads, self.d_n + self.d_r, D))
            # The source keys, used only for their per-head RMS: the key scale s = 1 / rms(W_K,g x).
            self.k_proj = nn.Linear(config.hidden_size, self.n_kv * D, bias=config.attention_bias)
            self.norm_eps = config.rms_norm_eps
        elif config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, q_out, bias=config.attention_bias)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=config.attention_bias)
            if config.latent_norm:
                self.q_a_layernorm = MLARMSNorm(config.q_lora_rank, eps=config.latent_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        self.kv_a_proj = nn.Linear(config.hidden_size, self.r + self.n_rope * self.d_r, bias=config.attention_bias)
        if config.latent_norm:                         # DeepSeek normalises c_kv before caching it
            self.kv_a_layernorm = MLARMSNorm(self.r, eps=config.latent_norm_eps)
        self.kv_b_proj = nn.Linear(self.r, self.num_heads * (self.d_n + self.d_v), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.d_v, config.hidden_size, bias=config.o_proj_bias)
        self.register_buffer("rope_freq_index", self.compute_freq_index(), persistent=False)  # (n_rope, d_r/2)
        self.register_buffer("rope_head_index", self.compute_head_index(), persistent=False)  # (n_rope, d_r/2)
        self.register_buffer("kv_head_of", torch.arange(self.num_heads) // (self.num_heads // self.n_kv),
                             persistent=False)                                                 # (H,)

    def compute_freq_index(self):
        cfg = self.config
        idx = cfg.rope_freq_index[self.layer_idx] if cfg.rope_freq_index else [list(range(self.d_r // 2))] * self.n_rope
        return torch.tensor(idx, dtype=torch.long)

    def compute_head_index(self):
        """Source KV head of each rotary pair: given by upcycling, else head g for RoPE head g (or 0)."""
        cfg = self.config
        if cfg.rope_head_index:
            return torch.tensor(cfg.rope_head_index[self.layer_idx], dtype=torch.long)
        return torch.arange(self.n_rope)[:, None].expand(self.n_rope, self.d_r // 2).clone()

    def _queries(self, x):
        if self.config.qk_norm:
            q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, -1)))  # (B, T, H, D)
            return torch.einsum("bthd,hed->bthe", q, self.q_head_proj).flatten(-2)
        if self.config.q_lora_rank is None:
            return self.q_proj(x)
        c_q = self.q_a_proj(x)                                              # (B, T, q_lora_rank)
        return self.q_b_proj(self.q_a_layernorm(c_q) if self.config.latent_norm else c_q)

    def _key_scales(self, x):
        """qk_norm: 1 / rms of each source key head, (B, T, n_kv)."""
        k = self.k_proj(x).unflatten(-1, (self.n_kv, -1)).float()               # (B, T, n_kv, D)
        return torch.rsqrt(k.pow(2).mean(-1) + self.norm_eps).to(x.dtype)

    def _rope_cos_sin(self, position_embeddings):
        cos, sin = position_embeddings                                      # (B, T, head_dim/2)
        cos, sin = cos[..., self.rope_freq_index], sin[..., self.rope_freq_index]  # (B, T, n_rope, d_r/2)
        return cos.transpose(1, 2), sin.transpose(1, 2)                     # (B, n_rope, T, d_r/2)

    def _use_absorbed(self, q_len, cached):
        # one new token against a cache: decode. (A one-token prompt takes it too: both paths are exact.)
        mode = self.config.absorb
        return mode == "always" or (mode == "auto" and q_len == 1 and cached)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        B, T, _ = hidden_states.shape
        H, n_rope, d_n, d_r = self.num_heads, self.n_rope, self.d_n, self.d_r
        q = self._queries(hidden_states).view(B, T, H, d_n + d_r).transpose(1, 2)  # (B, H, T, d_n + d_r)
        q_nope, q_rope = q.split([d_n, d_r], dim=-1)
        kv = self.kv_a_proj(hidden_states)                                  # (B, T, r + n_rope*d_r)
        c_kv = kv[..., : self.r].unsqueeze(1)                               # (B, 1, T, r)
        if self.config.latent_norm:
            c_kv = self.kv_a_layernorm(c_kv)
        k_rope = kv[..., self.r:].view(B, T, n_rope, d_r).transpose(1, 2)   # (B, n_rope, T, d_r)
        if self.config.qk_norm:
            s = self._key_scales(hidden_states)                             # (B, T, n_kv)
            s_rope = s[:, :, self.rope_head_index].transpose(1, 2)          # (B, n_rope, T, d_r/2)
            k_rope = k_rope * torch.cat([s_rope, s_rope], -1)
            c_kv = torch.cat([c_kv, s.unsqueeze(1)], -1)                    # (B, 1, T, r + n_kv)
        cos, sin = self._rope_cos_sin(position_embeddings)
        k_rope = apply_rope(k_rope, cos, sin)
        q_rope = apply_rope(q_rope.view(B, n_rope, H // n_rope, T, d_r), cos[:, :, None], sin[:, :, None]).view(B, H, T, d_r)
        past_len = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if isinstance(past_len, torch.Tensor):      # a static layer's running length, which update() advances
            past_len = past_len.clone()
        if cache is not None:
            c_kv, k_rope = cache.update(c_kv, k_rope, self.layer_idx)       # (B, 1, S, r [+ n_kv]), (B, n_rope, S, d_r)
        c_kv, s = c_kv[..., : self.r], (c_kv[:, 0, :, self.r:] if self.config.qk_norm else None)  # s (B, S, n_kv)
        if self._use_absorbed(T, cache is not None):
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope, s, attention_mask, past_len)
        else:
            out = self._expanded(q_nope, q_rope, c_kv, k_rope, s, attention_mask, **kwargs)
        return self.o_proj(out.reshape(B, T, H * self.d_v)), None

    def _expanded(self, q_nope, q_rope, c_kv, k_rope, s, attention_mask, **kwargs):
        B, H, T, _ = q_nope.shape
        S = c_kv.shape[2]
        kv = self.kv_b_proj(c_kv[:, 0]).view(B, S, H, self.d_n + self.d_v).transpose(1, 2)  # (B, H, S, d_n + d_v)
        k_nope, v = kv.split([self.d_n, self.d_v], dim=-1)
        if s is not None:
            k_nope = k_nope * s[:, :, self.kv_head_of].transpose(1, 2)[..., None]  # (B, H, S, 1) key scale
        k_rope = k_rope.repeat_interleave(H // self.n_rope, dim=1)         # (B, H, S, d_r)
        # Zero dims change no score and let fused SDPA kernels run at inference (without them a 16k
        # prefill falls back to the math kernel). Training keeps the unpadded path, the one whose GPU
        # distillation run converged (see BENCHMARKS.md).
        pad = -(self.d_n + self.d_r) % 8 if not torch.is_grad_enabled() else 0
        q = torch.cat([q_nope, q_rope, q_nope.new_zeros(B, H, T, pad)], dim=-1)  # (B, H, T, d_qk)
        k = torch.cat([k_nope, k_rope, k_nope.new_zeros(B, H, S, pad)], dim=-1)  # (B, H, S, d_qk)
        attn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        out, _ = attn(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                      scaling=self.scaling, **kwargs)
        return out                                                          # (B, T, H, d_v)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, s, attention_mask, past_len):
        B, H, T, _ = q_nope.shape
        S, n_rope = c_kv.shape[2], self.n_rope
        w = self.kv_b_proj.weight.view(H, self.d_n + self.d_v, self.r)
        w_uk, w_uv = w[:, : self.d_n], w[:, self.d_n:]                      # (H, d_n, r), (H, d_v, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)                # (B, H, T, r)
        # MQA over the latent with no copy of the cache: heads fold into query rows, so each score is
        # one matmul against c_kv (shared by all heads) plus one against the head group's RoPE key.
        scores = (q_lat.reshape(B, 1, H * T, self.r) @ c_kv.transpose(-1, -2)).view(B, H, T, S)
        if s is not None:
            scores = scores * s[:, :, self.kv_head_of].transpose(1, 2)[:, :, None]  # (B, H, 1, S) key scale
        scores = scores + (q_rope.reshape(B, n_rope, (H // n_rope) * T, self.d_r)
                           @ k_rope.transpose(-1, -2)).view(B, H, T, S)
        scores = scores.float() * self.scaling                              # (B, H, T, S)
        mask = _as_bool_mask(attention_mask, T, S, past_len, scores.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1).to(c_kv.dtype)
        out_lat = (probs.view(B, 1, H * T, S) @ c_kv).view(B, H, T, self.r)  # (B, H, T, r)
        return torch.einsum("bhtr,hdr->bthd", out_lat, w_uv)                 # (B, T, H, d_v)


def _as_bool_mask(mask, T, S, past_len, device):
    """A boolean (.., T, S) mask (True = attend) for SDPA, from whatever transformers built (or None)."""
    if mask is None:
        if T == 1:
            return None
        pos_q = torch.arange(T, device=device)[:, None] + past_len          # (T, 1); keys past it are masked
        return torch.arange(S, device=device)[None, :] <= pos_q
    if mask.dtype == torch.bool:
        return mask
    return mask == 0  # additive float mask: 0 = attend, large negative = masked


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    w = torch.matmul(query, key.transpose(2, 3)) * scaling                 # (B, H, T, S)
    if attention_mask is not None:
        w = w + attention_mask if attention_mask.dtype != torch.bool else w.masked_fill(~attention_mask, torch.finfo(w.dtype).min)
    w = F.dropout(F.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype), p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


class MLAMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i, bias=b), nn.Linear(h, i, bias=b), nn.Linear(i, h, bias=b)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLADecoderLayer(nn.Module):
    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAAttention(config, layer_idx)
        self.mlp = MLAMLP(config)
        self.input_layernorm = MLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, **kwargs)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MLAPreTrainedModel(PreTrainedModel):
    config_class = MLAConfig
    config: MLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLADecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False  # q/k (d_n + d_r) and v (d_v) widths differ
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # the absorbed decode step over MLAStaticLatentLayer (tests/mla/test_mla_static.py)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # from_pretrained builds on the meta device; non-persistent buffers are re-derived from the config.
        if isinstance(module, MLARotaryEmbedding):
            module.inv_freq.copy_(module.compute_inv_freq(module.config)[0])
        elif isinstance(module, MLAAttention):
            module.rope_freq_index.copy_(module.compute_freq_index())
            module.rope_head_index.copy_(module.compute_head_index())
            module.kv_head_of.copy_(torch.arange(module.num_heads) // (module.num_heads // module.n_kv))
            if module.config.qk_norm:
                init.normal_(module.q_head_proj, std=self.config.initializer_range)


class MLAModel(MLAPreTrainedModel):
    def __init__(self, config: MLAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([MLADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MLARotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, output_hidden_states=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)                        # MLALatentLayer per layer
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        make_mask = create_sliding_window_causal_mask if self.config.sliding_window else create_causal_mask
        mask = make_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         cache=cache, position_ids=position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(layer.__call__, hidden_states, position_embeddings, mask, cache)
            else:
                hidden_states = layer(hidden_states, position_embeddings, mask, cache, **kwargs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache,
                                       hidden_states=(*all_hidden, hidden_states) if output_hidden_states else None)


class MLAForCausalLM(MLAPreTrainedModel, GenerationMixin):
    """An MLA causal LM. Make one from a Llama/Mistral/Qwen2/Qwen3 checkpoint with ``hf_ext.mla.upcycle_to_mla``.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("out/smollm2-mla", trust_remote_code=True)  # doctest: +SKIP
        >>> out = model.generate(input_ids, max_new_tokens=32)   # the cache holds latents only  # doctest: +SKIP
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MLAConfig):
        super().__init__(config)
        self.model = MLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)


def latent_cache_bytes(cache) -> int:
    """Bytes held by the tensors of a cache (latent or not), measured, not computed from the config."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
