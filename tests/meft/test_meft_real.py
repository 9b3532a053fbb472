"""MEFT on the real checkpoints: reversible gradients equal ordinary autograd on MiniLM and SmolLM2."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_ext.eval import tokenize
from hf_ext.meft import MeftConfig
from hf_ext.zoo import load_causal_lm, load_corpus, resolve_model

pytestmark = pytest.mark.real


def grads(pm, batch, reversible):
    pm.zero_grad()
    pm.base_model.peft_config["default"].num_rev_layers = None if reversible else 0
    torch.manual_seed(7)
    pm(**batch).loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for n, p in pm.named_parameters() if "meft_" in n and p.requires_grad])


def live_adapters(pm):
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "meft_" in n and p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return pm.train()


def minilm_setup(**kw):
    path = resolve_model("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=8)
    ids = tokenize(tok, load_corpus("python-docs:eval"), 4 * 128).view(4, 128)
    batch = dict(input_ids=ids, labels=torch.tensor([0, 3, 5, 7]))
    return live_adapters(get_peft_model(model, MeftConfig(task_type="SEQ_CLS", check_every=1, **kw))), batch


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_real_minilm_gradients(variant):
    """The defaults (36 bits of scale): near-exact reversal, gradients as autograd's, the monitor silent."""
    pm, batch = minilm_setup(variant=variant)
    a, b = grads(pm, batch, True), grads(pm, batch, False)
    assert b.norm() > 0 and float((a - b).norm() / b.norm()) < 1e-4
    assert pm.base_model.last_recon_error < pm.base_model.peft_config["default"].check_threshold


@pytest.mark.parametrize("variant,lam,beta", [("meft1", 2 ** -3, 1.0), ("meft3", 2 ** -2, 2 ** -2)])
def test_real_minilm_reverses_bit_exactly_within_24_bits(variant, lam, beta):
    pm, batch = minilm_setup(variant=variant, lam=lam, beta=beta)
    assert torch.equal(grads(pm, batch, True), grads(pm, batch, False))
    assert pm.base_model.last_recon_error == 0.0


def test_real_smollm2_gradients():
    """Pre-LN decoder: the residual inside F makes the streams grow with depth. The defaults (meft1,
    lam = beta = 1, float64 streams) still give gradients within 1e-4, but the input of the first of 30
    layers only comes back to about 2%, and the monitor says so."""
    model, tok = load_causal_lm("smollm2-135m")
    ids = tokenize(tok, load_corpus("python-docs:eval"), 2 * 128).view(2, 128)
    pm = live_adapters(get_peft_model(model, MeftConfig(variant="meft1", task_type="CAUSAL_LM", check_every=1)))
    cfg = pm.base_model.peft_config["default"]
    assert (cfg.lam, cfg.beta) == (1.0, 1.0)
    batch = dict(input_ids=ids, labels=ids)
    with pytest.warns(UserWarning, match="reconstruct"):
        a = grads(pm, batch, True)
    b = grads(pm, batch, False)
    assert b.norm() > 0 and float((a - b).norm() / b.norm()) < 1e-4
    assert 0 < pm.base_model.last_recon_error < 0.1
