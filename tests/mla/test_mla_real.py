"""MLA on the real SmolLM2-135M (offline zoo): lossless equivalence, the CLI end to end, remote code."""
from __future__ import annotations

import json

import pytest
import torch

from conversion.cli import main
from hf_ext.eval import perplexity, tokenize
from hf_ext.mla import UpcycleConfig, upcycle_to_mla
from hf_ext.zoo import load_causal_lm, load_corpus
from helpers import run_without_hf_ext

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm("smollm2-135m")


def test_real_lossless_upcycle_reproduces_logits_and_greedy_tokens(smollm2):
    model, tok = smollm2
    mla, report = upcycle_to_mla(model, UpcycleConfig.lossless(model.config), progress=False)
    x = tokenize(tok, load_corpus("python-docs:eval"), 96)[None]
    with torch.no_grad():
        assert (mla(x).logits - model(x).logits).abs().max().item() < 1e-4
    prompt = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    assert torch.equal(mla.generate(prompt, max_new_tokens=10, do_sample=False),
                       model.generate(prompt, max_new_tokens=10, do_sample=False))
    assert report["kv_values_per_token"] == report["kv_values_per_token_source"] == 384


def test_real_default_init_beats_weight_svd_by_far(smollm2):
    """The calibrated init (RoRoPE + mean rotation + query/output-weighted factorisation) vs weight-only SVD."""
    model, tok = smollm2
    calib = tokenize(tok, load_corpus("python-docs:train"), 8192)
    ev = load_corpus("python-docs:eval")
    ours, _ = upcycle_to_mla(model, UpcycleConfig(kv_ratio=6.4), calib_ids=calib, progress=False)
    svd, _ = upcycle_to_mla(model, UpcycleConfig(kv_ratio=6.4, qk_rope_head_dim=8, rope_key_sharing="per_kv_head",
                                                 rope_rotation="none", rope_selection="high_freq", kv_init="svd",
                                                 nope_rotation="none"), progress=False)
    p_ours = perplexity(ours, tok, ev, max_tokens=1024, progress=False)["ppl"]
    p_svd = perplexity(svd, tok, ev, max_tokens=1024, progress=False)["ppl"]
    assert p_ours * 10 < p_svd


def test_real_cli_convert_mla_json_card_and_remote_code(tmp_path, capsys):
    out = tmp_path / "smollm2-mla"
    assert main(["convert", "mla", "--model", "smollm2-135m", "--kv-ratio", "6.4", "--calib-tokens", "4096",
                 "--max-tokens", "512", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["kv_values_per_token_source"] == 384 and r["kv_values_per_token"] == 60
    assert r["kv_ratio"] == pytest.approx(6.4) and r["distill_tokens"] == 0
    assert r["kv_bytes_per_token_source"] / r["kv_bytes_per_token"] == pytest.approx(6.4)  # measured in generate
    assert r["ppl_source"] < r["ppl_converted"] < 1000
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "library_name: hf-ext" in card
    assert f"{r['ppl_converted']:.4g}" in card
    got = run_without_hf_ext(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        x = tok("def fibonacci(n):", return_tensors="pt", add_special_tokens=False)
        o = m.generate(**x, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        print(json.dumps({{"tokens": o.sequences[0].tolist(), "layer": type(o.cache.layers[0]).__name__,
                          "rank": o.cache.layers[0].keys.shape[-1]}}))
    """)
    assert got["layer"] == "MLALatentLayer" and got["rank"] == 36
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ext  # noqa: F401

    m = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    x = tok("def fibonacci(n):", return_tensors="pt", add_special_tokens=False)
    assert m.generate(**x, max_new_tokens=6, do_sample=False)[0].tolist() == got["tokens"]
