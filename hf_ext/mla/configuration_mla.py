"""Configuration of the hf-ext MLA causal LM (model_type ``hfext_mla``)."""
from __future__ import annotations

from transformers import PreTrainedConfig


class MLAConfig(PreTrainedConfig):
    r"""Multi-head Latent Attention (DeepSeek-V2 layout) on a Llama-family body.

    Per token and layer the cache holds ``kv_lora_rank`` latent values plus ``n_rope_heads *
    qk_rope_head_dim`` RoPE-key values, where ``n_rope_heads`` is 1 for ``rope_key_sharing="shared"``
    and ``num_key_value_heads`` for ``"per_kv_head"``.

    Args:
        kv_lora_rank (`int`): r, the width of the cached latent c_kv = W_DKV x.
        qk_nope_head_dim (`int`): per-head query/key width of the position-free part (keys come from c_kv).
        qk_rope_head_dim (`int`): per-rope-head width of the decoupled RoPE key (even).
        v_head_dim (`int`): per-head value width (values come from c_kv).
        rope_key_sharing (`str`): ``"shared"`` (one RoPE key for all heads, DeepSeek / X-EcoMLA) or
            ``"per_kv_head"`` (one per source KV head, MHA2MLA).
        num_key_value_heads (`int`): KV heads of the source; query head h uses RoPE head h // (H / n_kv)
            in ``"per_kv_head"`` mode.
        rope_freq_index (`list[list[list[int]]]`, *optional*): for every layer and RoPE head, the index
            (into the source head's ``head_dim // 2`` RoPE frequencies) of each of its ``qk_rope_head_dim // 2``
            rotary pairs. Upcycling picks them; ``None`` means the first (highest) frequencies.
        head_dim (`int`): head width of the *source* model; RoPE frequencies are those of this width.
        softmax_scale (`float`, *optional*): attention scale; defaults to ``head_dim ** -0.5`` as in the source.
        q_lora_rank (`int`, *optional*): when set, queries go through a rank-``q_lora_rank`` bottleneck
            (DeepSeek-V3's query latent: ``latent_norm_init="gain"`` and the export set it to hidden_size).
        latent_norm (`bool`): DeepSeek's RMSNorms on the latents: ``kv_a_layernorm`` on c_kv (before it is
            cached) and, with ``q_lora_rank``, ``q_a_layernorm`` on the query latent. This is the architecture
            that ``hf_ext.mla.export_deepseek_v3`` writes, so distil with it to train what you export.
        latent_norm_eps (`float`): their epsilon; 1e-6 as in DeepSeek-V3 (transformers fixes it there).
        qk_norm (`bool`): the source normalises every query and key head by an RMSNorm before RoPE (Qwen3).
            Queries then keep the source projection and norm, followed by a per-head map, and keys keep
            the source's per-head RMS scale: ``num_key_value_heads`` scales per token join the cache.
        rope_head_index (`list[list[list[int]]]`, *optional*): with ``qk_norm``, the source KV head of each
            rotary pair (same layout as ``rope_freq_index``), whose RMS scale that pair takes.
        attention_bias (`bool`): bias on the query and RoPE-key projections (Qwen2 has one).
        o_proj_bias (`bool`): bias on the output projection (a source value bias folds into it exactly).
        absorb (`str`): ``"auto"`` runs decode (one new token over a cache) absorbed, attending as MQA over
            the latent, and everything else expanded; ``"always"`` / ``"never"`` force one path.

    ``layer_types`` is derived (``"mla_latent"`` per layer, so ``generate()`` builds the latent cache) and
    never serialised: transformers' generic config loader, which AutoTokenizer uses when hf-ext is not
    imported, only accepts its own layer types.

    Example:
        >>> from hf_ext.mla import MLAConfig, MLAForCausalLM
        >>> cfg = MLAConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, kv_lora_rank=12,
        ...                 qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
        >>> model = MLAForCausalLM(cfg)
        >>> cfg.kv_values_per_token
        16
    """

    model_type = "hfext_mla"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(self, vocab_size=32000, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, kv_lora_rank=44, qk_nope_head_dim=44,
                 qk_rope_head_dim=16, v_head_dim=64, rope_key_sharing="shared", rope_freq_index=None,
                 softmax_scale=None, q_lora_rank=None, latent_norm=False, latent_norm_eps=1e-6, qk_norm=False,
                 rope_head_index=None, hidden_act="silu",
                 max_position_embeddings=8192, initializer_range=0.02, rms_norm_eps=1e-5, rope_parameters=None,
                 attention_bias=False, o_proj_bias=False, mlp_bias=False, attention_dropout=0.0, absorb="auto",
                 sliding_window=None, use_cache=True, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                 tie_word_embeddings=False, **kwargs):
        if rope_key_sharing not in ("shared", "per_kv_head"):
            raise ValueError(f"rope_key_sharing={rope_key_sharing!r}; use 'shared' or 'per_kv_head'")
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={qk_rope_head_dim} is odd; RoPE rotates pairs, use an even width")
        if qk_norm and q_lora_rank is not None:
            raise ValueError("qk_norm keeps the source query projection; it cannot be combined with q_lora_rank")
        if absorb not in ("auto", "always", "never"):
            raise ValueError(f"absorb={absorb!r}; use 'auto', 'always' or 'never'")
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.latent_norm, self.latent_norm_eps = latent_norm, latent_norm_eps
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.rope_key_sharing, self.rope_freq_index = rope_key_sharing, rope_freq_index
        self.qk_norm, self.rope_head_index = qk_norm, rope_head_index
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps = initializer_range, rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias, self.o_proj_bias, self.mlp_bias = attention_bias, o_proj_bias, mlp_bias
        self.attention_dropout, self.absorb, self.sliding_window = attention_dropout, absorb, sliding_window
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._mla_ready = True  # from here on layer_types is visible (the base __init__ validated without it)

    @property
    def layer_types(self) -> list[str] | None:
        return ["mla_latent"] * self.num_hidden_layers if self.__dict__.get("_mla_ready") else None

    @layer_types.setter
    def layer_types(self, value):
        if value is not None and list(value) != ["mla_latent"] * self.num_hidden_layers:
            raise ValueError(f"layer_types of an MLA model is ['mla_latent'] * num_hidden_layers, got {value}")

    def validate(self):
        """The base validators (run again at save time), minus the allow-list of transformers' layer types."""
        for validator in PreTrainedConfig.__class_validators__:
            if validator.__name__ != "validate_layer_type":
                validator(self)

    def to_dict(self):
        out = super().to_dict()
        out.pop("_mla_ready", None)
        return out

    @property
    def n_rope_heads(self) -> int:
        return 1 if self.rope_key_sharing == "shared" else self.num_key_value_heads

    @property
    def kv_values_per_token(self) -> int:
        """Values cached per token per layer: the latent, the RoPE key(s) and, with qk_norm, the key scales."""
        return self.kv_lora_rank + self.n_rope_heads * self.qk_rope_head_dim + self.n_key_scales

    @property
    def n_key_scales(self) -> int:
        return self.num_key_value_heads if self.qk_norm else 0
