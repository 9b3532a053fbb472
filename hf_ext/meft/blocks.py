"""The attention and MLP blocks of supported transformers layers, with MEFT's adapter hooks.

A post-LN encoder layer (BERT, RoBERTa) is L(x) = M(A(x)) with
    A(x) = LN1(x + h_attn),                h_attn = drop(dense(SelfAttn(x)))   [+ attn_adapter(h_attn)]
    M(a) = LN2(a + drop(dense(FFN(a))))                                           [+ ffn_adapter(a) inside]
A pre-LN decoder layer (Llama, Mistral, Qwen2/3) is L(x) = M(A(x)) with
    A(x) = x + h_attn,                      h_attn = SelfAttn(LN1(x))          [+ attn_adapter(h_attn)]
    M(a) = a + MLP(LN2(a))                                                       [+ ffn_adapter(LN2(a))]
Adapters sit where the official MEFT code puts them: the FFN adapter parallel to the FFN, the MEFT3
attention adapter in series after the attention output. Both blocks include their residual connection,
so F and G of a coupling are whole blocks.
"""
from __future__ import annotations

ENCODERS = ("bert", "roberta")
DECODERS = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = ENCODERS + DECODERS


def _add(h, adapter, x):
    return h if adapter is None else h + adapter(x)


class EncoderBlocks:
    """BERT / RoBERTa ``*Layer``: attention(.self, .output) -> intermediate -> output."""

    @staticmethod
    def layers(model):
        return model.encoder.layer, "encoder.layer"

    @staticmethod
    def bind(args, kwargs):
        """The per-call inputs that HF passes identically to every layer (the attention mask)."""
        mask = args[0] if args else kwargs.get("attention_mask")
        return {"attention_mask": mask}

    @staticmethod
    def attention(layer, x, kw, attn_adapter=None):
        ctx = layer.attention.self(x, attention_mask=kw["attention_mask"])[0]
        so = layer.attention.output
        h = so.dropout(so.dense(ctx))
        return so.LayerNorm(_add(h, attn_adapter, h) + x)

    @staticmethod
    def mlp(layer, a, ffn_adapter=None):
        out = layer.output
        h = out.dropout(out.dense(layer.intermediate(a)))
        return out.LayerNorm(_add(h, ffn_adapter, a) + a)


class DecoderBlocks:
    """Llama-family ``*DecoderLayer``: input_layernorm -> self_attn; post_attention_layernorm -> mlp."""

    @staticmethod
    def layers(model):
        return model.layers, "layers"

    @staticmethod
    def bind(args, kwargs):
        if args:
            raise TypeError("MEFT expects decoder layers to be called with keyword arguments")
        return {k: v for k, v in kwargs.items() if k not in ("use_cache",)}

    @staticmethod
    def attention(layer, x, kw, attn_adapter=None):
        h = layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0]
        return x + _add(h, attn_adapter, h)

    @staticmethod
    def mlp(layer, a, ffn_adapter=None):
        n = layer.post_attention_layernorm(a)
        return a + _add(layer.mlp(n), ffn_adapter, n)


def blocks_for(model_type: str):
    return EncoderBlocks if model_type in ENCODERS else DecoderBlocks
