"""MEFT against an independent reference: the paper's two-stream couplings written out by hand over the HF
layers' own submodules (not ``hf_ext.meft.blocks`` or ``ops``), for every family the README names.

Liao et al. (2023), section 3: a reversible layer maps (x1, x2) to
    y1 = lam * x1 + F(x2),    y2 = beta * x2 + G(y1)
and the variants differ in what F and G are:
    MEFT1: F = the pretrained layer (adapter parallel to its FFN), G = an adapter,  streams swap after the layer
    MEFT2: F = an adapter, G = the pretrained layer,                                streams swap after the layer
    MEFT3: F = the attention block (adapter after attention), G = the FFN block (adapter parallel to the FFN)
Both streams start as the embedding output; the output is the stream that carries the pretrained path.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from conftest import tiny_causal_lm
from hf_ext.meft import MeftConfig
from numerics import ROUND_TRIP_RTOL64, assert_close_rel

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

ENCODERS = ("bert", "roberta")


def tiny(family):
    torch.manual_seed(0)
    if family in ENCODERS:
        cfg = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                   num_labels=3, max_position_embeddings=64)
        return (BertForSequenceClassification(BertConfig(**cfg)) if family == "bert"
                else RobertaForSequenceClassification(RobertaConfig(**cfg, pad_token_id=1)))
    return tiny_causal_lm(family, num_hidden_layers=3)


def adapter(a, x):
    """The adapter of the paper: up(act(down(x))), written out with the adapter's weights."""
    return F.linear(a.act(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)


def attention_block(family, layer, x, inputs, attn_adapter=None):
    if family in ENCODERS:                                # post-LN: LN(x + dense(SelfAttn(x)))
        h = layer.attention.output.dense(layer.attention.self(x, attention_mask=inputs["attention_mask"])[0])
        h = h if attn_adapter is None else h + adapter(attn_adapter, h)
        return layer.attention.output.LayerNorm(h + x)
    h = layer.self_attn(hidden_states=layer.input_layernorm(x), **inputs)[0]   # pre-LN: x + SelfAttn(LN(x))
    return x + (h if attn_adapter is None else h + adapter(attn_adapter, h))


def ffn_block(family, layer, a, ffn_adapter):
    if family in ENCODERS:                                # post-LN: LN(a + dense(FFN(a)) + adapter(a))
        h = layer.output.dense(layer.intermediate(a))
        return layer.output.LayerNorm(h + adapter(ffn_adapter, a) + a)
    n = layer.post_attention_layernorm(a)                 # pre-LN: a + MLP(LN(a)) + adapter(LN(a))
    return a + layer.mlp(n) + adapter(ffn_adapter, n)


def reference(family, variant, lam, beta, meft_layers, h0, inputs):
    x1 = x2 = h0
    for m in meft_layers:
        layer = m.base_layer
        plm = lambda x, m=m, layer=layer: ffn_block(family, layer, attention_block(family, layer, x, inputs),  # noqa: E731
                                                    m.meft_ffn["default"])
        rev = lambda x, m=m: adapter(m.meft_rev["default"], x) if variant != "meft3" else None  # noqa: E731
        if variant == "meft1":
            y1 = lam * x1 + plm(x2)
            y2 = beta * x2 + rev(y1)
            x1, x2 = y2, y1
        elif variant == "meft2":
            y1 = lam * x1 + rev(x2)
            y2 = beta * x2 + plm(y1)
            x1, x2 = y2, y1
        else:
            y1 = lam * x1 + attention_block(family, layer, x2, inputs, m.meft_attn["default"])
            y2 = beta * x2 + ffn_block(family, layer, y1, m.meft_ffn["default"])
            x1, x2 = y1, y2
    return x1 if variant == "meft2" else x2


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "mistral", "qwen2", "qwen3"])
@torch.no_grad()
def test_meft_equals_the_papers_couplings(family, variant):
    lam, beta = {"meft1": (0.5, 1.0), "meft2": (1.0, 0.5), "meft3": (0.5, 0.25)}[variant]
    task = "SEQ_CLS" if family in ENCODERS else "CAUSAL_LM"
    pm = get_peft_model(tiny(family), MeftConfig(task_type=task, variant=variant, lam=lam, beta=beta))
    torch.manual_seed(1)
    for n, p in pm.named_parameters():                    # adapters start at 0; make them matter
        if "meft_" in n:
            torch.nn.init.normal_(p, std=0.1)
    pm = pm.double().eval()                               # float64 on both sides: see the tolerance below
    meft_layers = [m for m in pm.modules() if type(m).__name__ == "MeftLayer"]
    seen = {}
    first = meft_layers[0].base_layer                     # the inputs HF hands the first layer, by HF's own code
    hooks = [first.register_forward_pre_hook(lambda mod, a, kw: seen.update(h0=a[0], a=a[1:], kw=kw),
                                             with_kwargs=True),
             meft_layers[-1].register_forward_hook(lambda mod, a, out: seen.update(out=out))]
    ids = torch.randint(3, 100, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                       # a left-padded row, so the mask matters
    with pm.disable_adapter():
        pm(input_ids=ids, attention_mask=mask)            # captures h0 and the shared inputs
    h0, args, kw = seen["h0"], seen["a"], seen["kw"]
    inputs = ({"attention_mask": args[0] if args else kw.get("attention_mask")} if family in ENCODERS
              else {k: v for k, v in kw.items() if k not in ("use_cache", "past_key_values", "cache")})
    pm(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    got = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    want = reference(family, variant, lam, beta, meft_layers, h0, inputs)
    assert float((want - h0).abs().max()) > 1e-2          # the stack really changes its input
    # Both sides evaluate the same formulas in float64; only the order of some sums may differ, so they agree
    # to ROUND_TRIP_RTOL64 (tests/numerics.py); a wrong coupling, swap, scale or output stream is O(1) off.
    assert_close_rel(got, want, ROUND_TRIP_RTOL64)
