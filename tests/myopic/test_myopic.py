"""Myopic attention: forward equals eager, gradients equal the untied-parameters reference, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoConfig, GPTNeoForCausalLM, GPTNeoXConfig,
                          LlamaConfig, MistralConfig, Qwen2Config)

from hf_ext.myopic import MyopicError, count_myopic_calls, enable_myopic, myopic_attention, myopic_grads_naive
from hf_ext.myopic.ops import attention_reference, myopic_attention_naive

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

KW = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: LlamaConfig(**KW),
    "qwen2": lambda: Qwen2Config(**KW),
    "mistral": lambda: MistralConfig(**KW, sliding_window=4),          # window < sequence: exercised
    "gpt2": lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0,
                               embd_pdrop=0, attn_pdrop=0),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64),
}


def tiny(family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="eager").float()


def batch(padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0                                                 # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # no target predicted from a pad
    return ids, (mask if padded else None), labels


def loss_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_pass_equals_untied_reference(family, padded):
    model = tiny(family)
    ids, mask, labels = batch(padded)
    ref = myopic_grads_naive(copy.deepcopy(model), ids, mask, labels)
    vanilla_logits, vanilla = loss_grads(copy.deepcopy(model), ids, mask, labels)
    myopic = enable_myopic(copy.deepcopy(model))
    logits, grads = loss_grads(myopic, ids, mask, labels)
    assert count_myopic_calls(myopic) == 2                              # both layers went through it
    real = slice(None) if mask is None else mask.bool()
    # the forward is eager's bit for bit: the same ops in the same order on the same values (keys and values
    # detached), plus terms that are exactly 0 (x - x.detach()), which leave every value unchanged
    assert torch.equal(logits[real], vanilla_logits[real])
    # every parameter, fp32: one pass vs T incremental passes sum the same terms in other orders; the grads
    # are O(1e-2) sums over <= 64-wide products in 2 layers, each within gamma(64) = 4e-6 relative: 1e-5 holds
    assert max_diff(grads, ref) <= 1e-5
    assert max_diff(vanilla, ref) > 1e-3                                # and myopic is not vanilla


@pytest.mark.parametrize("w", [1, 2, 3, 100])
def test_local_window_matches_per_query_definition(w):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, requires_grad=True)                     # 5 queries, the last of 7 keys
    k = torch.randn(2, 2, 7, 8, requires_grad=True)
    v = torch.randn(2, 2, 7, 8, requires_grad=True)
    causal = torch.full((7, 7), float("-inf")).triu(1)[2:]             # (5, 7)
    mask = causal.expand(2, 1, 5, 7).clone()
    mask[1, ..., :2] = float("-inf")                                    # padding in one row
    go = torch.randn(2, 5, 4, 8)
    outs = []
    for fn in (lambda: myopic_attention(q, k, v, mask, local_window=w)[0],
               lambda: myopic_attention_naive(q, k, v, mask, local_window=w),
               lambda: attention_reference(q, k, v, mask)):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), go)
        outs.append((out.detach(), grads))
    (o1, g1), (o2, g2), (o3, g3) = outs
    # fp32, unit-variance inputs, sums over <= 8 dims and 7 keys: each side within gamma(8) ~ 5e-7 relative of
    # exact per op, a few ops deep, on values of O(1): 1e-6 (outputs) and 1e-5 (gradients, ~10x larger) hold
    assert torch.allclose(o1, o3, atol=1e-6, rtol=0) and torch.allclose(o1, o2, atol=1e-6, rtol=0)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    if w >= 7:                                                          # a window covering everything is vanilla
        assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(g1, g3))
    else:                                                               # detached keys: O(1) gradient missing
        assert not torch.allclose(g1[1], g3[1], atol=1e-2, rtol=0)


def test_from_pretrained_and_generate(tmp_path):
    import hf_ext.myopic  # noqa: F401  (registers attn_implementation="myopic")

    tiny("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="myopic").eval()
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (1, 5))
    a = model.generate(ids, max_new_tokens=6, do_sample=False)
    b = eager.generate(ids, max_new_tokens=6, do_sample=False)
    # token for token: the forward is eager's bit for bit (test_one_pass_equals_untied_reference)
    assert torch.equal(a, b) and count_myopic_calls(model) > 0


def test_bad_input():
    torch.manual_seed(0)
    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                         attention_types=[[["global"], 2]], max_position_embeddings=64))
    with pytest.raises(MyopicError, match="gpt_neo.*does not route its attention"):
        enable_myopic(neo)
    for w in (0, -3, 1.5):
        with pytest.raises(MyopicError, match="local_window"):
            enable_myopic(tiny("llama"), local_window=w)


def test_soft_capping_and_attention_sinks_are_refused():
    from transformers import Gemma2Config

    from hf_ext.myopic.attention import myopic_attention_forward

    torch.manual_seed(0)
    gemma2 = AutoModelForCausalLM.from_config(Gemma2Config(**KW, head_dim=8, attn_logit_softcapping=50.0))
    enable_myopic(gemma2)                           # routes through the interface, so it is accepted here...
    with pytest.raises(MyopicError, match="Gemma2Attention passes softcap"):
        gemma2(torch.randint(0, 64, (1, 6)))        # ...and refused where it would soft-cap the logits
    module = torch.nn.Linear(1, 1)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    for kw in ({"s_aux": torch.zeros(2)}, {"sinks": torch.zeros(2)}):
        with pytest.raises(MyopicError, match=f"passes {next(iter(kw))}"):
            myopic_attention_forward(module, q, k, k, None, **kw)
