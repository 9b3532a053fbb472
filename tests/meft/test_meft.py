"""MEFT: reversible gradients vs autograd, RNG replay, the numerical monitor, PEFT save/load, bad input.

How exact the reversal is depends on the machine (see ``hf_ext/meft/ops.py``): the stream arithmetic is
exact, but the backward must recompute F and G bit for bit, and whether kernels do is the machine's
business. So the tests assert what holds on every machine:
- the arithmetic is exact when the recompute is (``test_stream_arithmetic_is_exact``, by construction);
- the monitor is truthful: the relative gradient error never exceeds the reconstruction error it reports
  (``assert_monitor_bounds_the_gradient_error``), and it is silent at the default scales;
- a recompute that differs in the last bit is caught (emulated, so it happens on every machine).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import hf_ext.meft as meft
from hf_ext.meft import MeftConfig, MeftError, default_scales, ops
from hf_ext.meft.measure import saved_activation_bytes
from hf_ext.meft.model import MeftLayer
from meft_checks import assert_monitor_bounds_the_gradient_error, rel
from numerics import U32, assert_round_trip

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`


def tiny_bert(layers=3, dropout=0.1):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def tiny_llama(layers=3):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2))


def wrap(model, task, **kw):
    pm = get_peft_model(model, MeftConfig(task_type=task, **{"check_every": 1, **kw}))
    for n, p in pm.named_parameters():          # adapters start at 0; give them values so every grad is live
        if "meft_" in n and p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return pm.train()


def adapter_grads(pm, batch, reversible: bool):
    pm.zero_grad()
    pm.base_model.peft_config["default"].num_rev_layers = None if reversible else 0
    torch.manual_seed(123)                      # same dropout masks in both runs
    pm(**batch).loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for n, p in pm.named_parameters() if "meft_" in n and p.requires_grad])


BERT_BATCH = dict(input_ids=torch.randint(0, 100, (4, 16)), labels=torch.tensor([0, 2, 1, 1]))
LLAMA_BATCH = dict(input_ids=torch.randint(0, 100, (2, 16)), labels=torch.randint(0, 100, (2, 16)))


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_reversible_gradients_equal_autograd_at_defaults(variant, family):
    model, task, batch = ((tiny_bert(), "SEQ_CLS", BERT_BATCH) if family == "bert"
                          else (tiny_llama(), "CAUSAL_LM", LLAMA_BATCH))
    pm = wrap(model, task, variant=variant)
    a, b = adapter_grads(pm, batch, True), adapter_grads(pm, batch, False)
    assert_monitor_bounds_the_gradient_error(pm, a, b)


def test_paper_scales_in_float32_are_wrong_and_float64_power_of_two_is_exact():
    """The issue's finding on a tiny 6-layer BERT: lam = beta = 0.1 with float32 streams gives
    meaningless gradients; our defaults do not."""
    pm = wrap(tiny_bert(layers=6), "SEQ_CLS", variant="meft3", lam=0.1, beta=0.1, reconstruction_dtype="float32",
              check_every=0)
    bad = rel(adapter_grads(pm, BERT_BATCH, True), adapter_grads(pm, BERT_BATCH, False))
    assert bad > 1e-2                       # 0.1 = 2^-3.3: every product rounds, 1/(lam beta)^6 = 1e6 amplifies
    pm = wrap(tiny_bert(layers=6), "SEQ_CLS", variant="meft3")
    assert_monitor_bounds_the_gradient_error(pm, adapter_grads(pm, BERT_BATCH, True), adapter_grads(pm, BERT_BATCH, False))


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_bf16_model_with_float64_streams_is_exact(variant):
    """bf16 weights and compute (adapters stay fp32, like LoRA's): the float64 streams still reverse
    exactly, so the gradients equal autograd's bit for bit; bf16 streams do not."""
    pm = wrap(tiny_bert(layers=4).to(torch.bfloat16), "SEQ_CLS", variant=variant)
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "meft_" in n)
    assert_monitor_bounds_the_gradient_error(pm, adapter_grads(pm, BERT_BATCH, True),
                                             adapter_grads(pm, BERT_BATCH, False))
    pm = wrap(tiny_bert(layers=4).to(torch.bfloat16), "SEQ_CLS", variant=variant, reconstruction_dtype="bfloat16",
              check_every=0)
    # bf16 streams round every sum to 8 bits (UBF16 = 4e-3), amplified by 1/scale per layer: far above 1e-3
    assert rel(adapter_grads(pm, BERT_BATCH, True), adapter_grads(pm, BERT_BATCH, False)) > 1e-3


def test_partial_reversibility_matches_too():
    pm = wrap(tiny_bert(layers=4), "SEQ_CLS", variant="meft1", num_rev_layers=2)
    cfg = pm.base_model.peft_config["default"]
    pm.zero_grad()
    torch.manual_seed(123)
    pm(**BERT_BATCH).loss.backward()
    a = torch.cat([p.grad.flatten() for n, p in pm.named_parameters() if "meft_" in n and p.grad is not None])
    cfg.num_rev_layers = 0
    pm.zero_grad()
    torch.manual_seed(123)
    pm(**BERT_BATCH).loss.backward()
    b = torch.cat([p.grad.flatten() for n, p in pm.named_parameters() if "meft_" in n and p.grad is not None])
    assert_monitor_bounds_the_gradient_error(pm, a, b)


def test_dropout_masks_are_replayed():
    """With dropout on, a wrong replay would make the reconstruction (and gradients) wrong."""
    pm = wrap(tiny_bert(dropout=0.3), "SEQ_CLS", variant="meft3")
    first = pm.base_model.model.bert.encoder.layer[0]
    x = torch.randn(2, 8, 32).double()          # streams start from float32 hidden states
    couplings = [layer.coupling({"attention_mask": None}) for layer in first.stack]
    # a mask drawn afresh differs in ~42% of the entries (2 p (1 - p)), an O(1) error; replayed, the
    # reconstruction is as good as the recompute: within the monitor's threshold
    assert ops.reconstruction_error(couplings, x, x, torch.float32) <= MeftConfig().check_threshold
    with torch.no_grad():                    # the same round trip with masks drawn afresh: no replay
        back = ops.reversible_naive(couplings, x, x, torch.float32)
        for c in reversed(couplings):
            back = ops.coupling_inverse(c, *back, torch.float32)
    assert float((back[0] - x).abs().max() / x.abs().max()) > 0.1


def test_monitor_warns_at_start_and_raises_when_asked():
    pm = wrap(tiny_bert(layers=6), "SEQ_CLS", variant="meft3", lam=0.1, beta=0.1, reconstruction_dtype="float32")
    with pytest.warns(UserWarning, match="reconstruction_dtype='float64'"):
        pm(**BERT_BATCH).loss.backward()
    assert pm.base_model.last_recon_error > 1e-4
    pm.base_model.peft_config["default"].check_action = "raise"
    with pytest.raises(FloatingPointError, match="not trustworthy"):
        pm(**BERT_BATCH).loss.backward()


def test_safe_defaults_pass_the_monitor_silently():
    pm = wrap(tiny_bert(layers=6), "SEQ_CLS", variant="meft3")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="MEFT")
        pm(**BERT_BATCH).loss.backward()
    assert pm.base_model.last_recon_error <= pm.base_model.peft_config["default"].check_threshold


def _grad_mode_kernel(fn):
    """``fn`` as a kernel that rounds differently when it recomputes in the backward (grad enabled):
    one float32 ulp up on every output, which is what another SIMD path can do."""
    def wrapped(x):
        y = fn(x)
        return torch.nextafter(y, torch.full_like(y, float("inf"))) if torch.is_grad_enabled() else y
    return wrapped


def test_stream_arithmetic_is_exact():
    """When F and G recompute bit for bit, float64 streams with power-of-two scales reverse exactly.

    The proof for these couplings: every F/G output is a float32 in [1/4, 3/4), so its lowest set bit is
    >= 2^-26; the inputs are float32 in [1/4, 3/4) as well. Multiplying by lam, beta = 2^-2 moves a
    stream's lowest bit down by 2, and the stream is a sum of such terms: after 4 layers every lowest bit
    is >= 2^-(26 + 2*4*2) = 2^-42 (both scales act on each stream through the swaps at most once per
    layer each), while every magnitude stays below 2^3 (each layer adds < 1). The span is < 45 bits <= 53,
    so every float64 sum and difference is exact, and the inverse rebuilds the inputs bit for bit. The
    elementwise F and G are recomputed bit for bit on every machine, so the gradients equal autograd's
    bit for bit too (same operations on the same values)."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.nn.Parameter(torch.rand(16, generator=g) * 2 - 1) for _ in range(8)]
    fs = [lambda v, w=w: 0.5 + 0.25 * torch.tanh(v * w) for w in ws]     # values in [1/4, 3/4)
    for swap in (False, True):
        couplings = [ops.Coupling(fs[2 * i], fs[2 * i + 1], 0.25, 0.25, swap) for i in range(4)]
        x1, x2 = [(0.25 + 0.5 * torch.rand(3, 16, generator=g)).double() for _ in range(2)]
        assert ops.reconstruction_error(couplings, x1, x2, torch.float32) == 0.0
        y = ops.ReversibleStack.apply(x1, x2, couplings, torch.float32, None, *ws)
        want = ops.reversible_naive(couplings, x1, x2, torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(y, want))
        dy = [torch.randn(3, 16, generator=g, dtype=torch.float64) for _ in range(2)]
        got = torch.autograd.grad(y, ws, dy)
        assert all(torch.equal(a, b) for a, b in zip(got, torch.autograd.grad(want, ws, dy)))
    # the same couplings with every recompute one ulp off: each layer divides the error by lam or beta (4)
    # on its way down, so after 4 layers it is hundreds of ulps (990 measured), not one
    assert ops.reconstruction_error([_rounding_differently(c) for c in couplings], x1, x2, torch.float32) > 4 ** 3 * U32


def test_a_recompute_that_rounds_differently_is_caught(monkeypatch):
    """On a machine whose kernels round differently in the backward than in the forward, the default
    scales amplify the difference; the first-step check and the monitor must say so, and the monitor's
    reading must still bound the gradient error. Emulated, so this runs the same on every machine."""
    coupling = MeftLayer.coupling
    monkeypatch.setattr(MeftLayer, "coupling", lambda self, kw: _rounding_differently(coupling(self, kw)))
    pm = wrap(tiny_bert(layers=6), "SEQ_CLS", variant="meft3")
    with pytest.warns(UserWarning, match="reconstructs the input with relative error"):
        a = adapter_grads(pm, BERT_BATCH, True)
    b = adapter_grads(pm, BERT_BATCH, False)
    assert_monitor_bounds_the_gradient_error(pm, a, b, silent=False)
    assert pm.base_model.last_recon_error > pm.base_model.peft_config["default"].check_threshold
    pm.base_model.peft_config["default"].check_action = "raise"
    with pytest.raises(FloatingPointError, match="not trustworthy"):
        adapter_grads(pm, BERT_BATCH, True)


def _rounding_differently(c):
    return ops.Coupling(_grad_mode_kernel(c.F), _grad_mode_kernel(c.G), c.lam, c.beta, c.swap)


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
def test_init_deviation_shrinks_with_the_scales(variant):
    devs = []
    for s in (1.0, 0.5, 0.25, 0.125):
        lam, beta = {"meft1": (s, 1.0), "meft2": (1.0, s), "meft3": (s, s)}[variant]
        pm = get_peft_model(tiny_bert(layers=4, dropout=0.0), MeftConfig(task_type="SEQ_CLS", variant=variant,
                                                                          lam=lam, beta=beta)).eval()
        x = BERT_BATCH["input_ids"]
        with torch.no_grad():
            h = pm.base_model.model.bert(input_ids=x).last_hidden_state
            with pm.disable_adapter():
                h0 = pm.base_model.model.bert(input_ids=x).last_hidden_state
        devs.append(float((h - h0).norm() / h0.norm()))
    assert all(a > b for a, b in zip(devs, devs[1:])), devs
    assert devs[-1] < 0.2


def test_default_scales_follow_depth():
    assert default_scales("meft1", 6) == (2.0 ** -6, 1.0)
    assert default_scales("meft1", 2) == (2.0 ** -8, 1.0)
    assert default_scales("meft3", 12) == (0.5, 0.5)
    assert default_scales("meft3", 30) == (1.0, 1.0)


def test_saved_activations_are_flat_in_depth():
    def saved(layers):
        pm = wrap(tiny_bert(layers=layers, dropout=0.0), "SEQ_CLS", variant="meft3")
        return saved_activation_bytes(pm(**BERT_BATCH).loss, pm)
    assert saved(4) == saved(8)


def test_save_load_round_trip(tmp_path):
    pm = wrap(tiny_bert(dropout=0.0), "SEQ_CLS", variant="meft2").eval()
    pm.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(tiny_bert(dropout=0.0), tmp_path).eval()
    assert back.peft_config["default"].peft_type == "MEFT"
    assert any("meft_" in k for k in back.state_dict())
    with torch.no_grad():
        assert_round_trip(back, pm, lambda m: m(input_ids=BERT_BATCH["input_ids"]).logits)


def test_target_layers_freeze_the_bottom():
    pm = wrap(tiny_bert(layers=4), "SEQ_CLS", variant="meft1", target_layers=[2, 3])
    names = [n for n, p in pm.named_parameters() if "meft_" in n]
    assert names and all(".layer.2." in n or ".layer.3." in n for n in names)
    assert_monitor_bounds_the_gradient_error(pm, adapter_grads(pm, BERT_BATCH, True),
                                             adapter_grads(pm, BERT_BATCH, False))


def test_bad_input():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(MeftError, match="supported: bert, roberta, llama"):
        get_peft_model(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64)),
                       MeftConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="lam=0"):
        MeftConfig(lam=0)
    with pytest.raises(ValueError, match="variant"):
        MeftConfig(variant="meft4")
    with pytest.raises(MeftError, match="contiguous"):
        get_peft_model(tiny_bert(), MeftConfig(task_type="SEQ_CLS", target_layers=[0, 2]))
    assert meft.PEFT_TYPE == "MEFT"
