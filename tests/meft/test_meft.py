"""MEFT: reversible gradients vs autograd, RNG replay, the numerical monitor, PEFT save/load, bad input."""
from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import hf_ext.meft as meft
from hf_ext.meft import MeftConfig, MeftError, default_scales, ops
from hf_ext.meft.measure import saved_activation_bytes


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
    pm = get_peft_model(model, MeftConfig(task_type=task, check_every=0, **kw))
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


def rel(a, b):
    return float((a - b).norm() / b.norm())


BERT_BATCH = dict(input_ids=torch.randint(0, 100, (4, 16)), labels=torch.tensor([0, 2, 1, 1]))
LLAMA_BATCH = dict(input_ids=torch.randint(0, 100, (2, 16)), labels=torch.randint(0, 100, (2, 16)))


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_reversible_gradients_equal_autograd_at_defaults(variant, family):
    model, task, batch = ((tiny_bert(), "SEQ_CLS", BERT_BATCH) if family == "bert"
                          else (tiny_llama(), "CAUSAL_LM", LLAMA_BATCH))
    pm = wrap(model, task, variant=variant)
    a, b = adapter_grads(pm, batch, True), adapter_grads(pm, batch, False)
    assert b.norm() > 0
    # power-of-two scales + float64 streams: exact arithmetic, so the reversal is bit-exact
    assert rel(a, b) < 1e-4
    assert rel(a, b) == 0.0


def test_paper_scales_in_float32_are_wrong_and_float64_power_of_two_is_exact():
    """The issue's finding on a tiny 6-layer BERT: lam = beta = 0.1 with float32 streams gives
    meaningless gradients; our defaults do not."""
    pm = wrap(tiny_bert(layers=6), "SEQ_CLS", variant="meft3", lam=0.1, beta=0.1, reconstruction_dtype="float32")
    bad = rel(adapter_grads(pm, BERT_BATCH, True), adapter_grads(pm, BERT_BATCH, False))
    pm = wrap(tiny_bert(layers=6), "SEQ_CLS", variant="meft3")
    good = rel(adapter_grads(pm, BERT_BATCH, True), adapter_grads(pm, BERT_BATCH, False))
    assert bad > 1e-2 and good == 0.0


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_bf16_model_with_float64_streams_is_exact(variant):
    """bf16 weights and compute (adapters stay fp32, like LoRA's): the float64 streams still reverse
    exactly, so the gradients equal autograd's bit for bit; bf16 streams do not."""
    pm = wrap(tiny_bert(layers=4).to(torch.bfloat16), "SEQ_CLS", variant=variant)
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "meft_" in n)
    a, b = adapter_grads(pm, BERT_BATCH, True), adapter_grads(pm, BERT_BATCH, False)
    assert b.norm() > 0 and rel(a, b) == 0.0
    pm = wrap(tiny_bert(layers=4).to(torch.bfloat16), "SEQ_CLS", variant=variant, reconstruction_dtype="bfloat16")
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
    assert torch.equal(a, b)


def test_dropout_masks_are_replayed():
    """With dropout on, a wrong replay would make the reconstruction (and gradients) wrong."""
    pm = wrap(tiny_bert(dropout=0.3), "SEQ_CLS", variant="meft3")
    first = pm.base_model.model.bert.encoder.layer[0]
    x = torch.randn(2, 8, 32).double()          # streams start from float32 hidden states
    couplings = [layer.coupling({"attention_mask": None}) for layer in first.stack]
    assert ops.reconstruction_error(couplings, x, x, torch.float32) == 0.0


def test_monitor_warns_at_start_and_raises_when_asked():
    pm = wrap(tiny_bert(layers=6), "SEQ_CLS", variant="meft3", lam=0.1, beta=0.1, reconstruction_dtype="float32")
    pm.base_model.peft_config["default"].check_every = 1
    with pytest.warns(UserWarning, match="reconstruction_dtype='float64'"):
        pm(**BERT_BATCH).loss.backward()
    assert pm.base_model.last_recon_error > 1e-4
    pm.base_model.peft_config["default"].check_action = "raise"
    with pytest.raises(FloatingPointError, match="not trustworthy"):
        pm(**BERT_BATCH).loss.backward()


def test_safe_defaults_pass_the_monitor_silently():
    pm = wrap(tiny_bert(layers=6), "SEQ_CLS", variant="meft3")
    pm.base_model.peft_config["default"].check_every = 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="MEFT")
        pm(**BERT_BATCH).loss.backward()
    assert pm.base_model.last_recon_error == 0.0


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
    with torch.no_grad():
        assert torch.equal(back(input_ids=BERT_BATCH["input_ids"]).logits, pm(input_ids=BERT_BATCH["input_ids"]).logits)
    sd = {k: v for k, v in back.state_dict().items() if "meft_" in k}
    assert sd and all(torch.equal(v, pm.state_dict()[k]) for k, v in sd.items())


def test_target_layers_freeze_the_bottom():
    pm = wrap(tiny_bert(layers=4), "SEQ_CLS", variant="meft1", target_layers=[2, 3])
    names = [n for n, p in pm.named_parameters() if "meft_" in n]
    assert names and all(".layer.2." in n or ".layer.3." in n for n in names)
    a, b = adapter_grads(pm, BERT_BATCH, True), adapter_grads(pm, BERT_BATCH, False)
    assert rel(a, b) == 0.0


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
