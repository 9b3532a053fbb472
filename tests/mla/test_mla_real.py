"""MLA on the real SmolLM2-135M (offline zoo): lossless equivalence, the CLI end to end, remote code."""
from __future__ import annotations

import json

import pytest
import torch

from conversion.cli import main
from hf_ext.eval import perplexity, tokenize
from hf_ext.mla import UpcycleConfig, upcycle_to_mla
from hf_ext.mla.export import fold_identity_latents
from hf_ext.zoo import load_causal_lm, load_corpus
from helpers import run_without_hf_ext
from numerics import REAL_FP32_RTOL, assert_close_rel, assert_greedy_agrees, greedy

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm("smollm2-135m")


@pytest.mark.numerics
def test_real_lossless_upcycle_reproduces_logits_and_greedy_tokens(smollm2):
    model, tok = smollm2
    mla, report = upcycle_to_mla(model, UpcycleConfig.lossless(model.config), progress=False)
    x = tokenize(tok, load_corpus("python-docs:eval"), 96)[None]
    with torch.no_grad():
        want = model(x).logits
        # equal up to fp32 rounding (bit for bit under this machine's AVX2 and no-SIMD kernels): tests/numerics.py
        assert_close_rel(mla(x).logits, want, REAL_FP32_RTOL)
    prompt = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    atol = REAL_FP32_RTOL * float(want.abs().max())
    assert_greedy_agrees(*greedy(mla, prompt, max_new_tokens=10), *greedy(model, prompt, max_new_tokens=10), atol,
                         min_steps=8)
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
    # README (4096 eval tokens): 124.6 vs 107955. The factor 10 is the claim "by far"; the default init's own
    # quality is held to its measured value by test_real_cli_convert_mla_json_card_and_remote_code
    assert p_ours * 10 < p_svd


def test_real_cli_convert_mla_json_card_and_remote_code(tmp_path, capsys):
    out = tmp_path / "smollm2-mla"
    assert main(["convert", "mla", "--model", "smollm2-135m", "--kv-ratio", "6.4", "--calib-tokens", "4096",
                 "--max-tokens", "512", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["kv_values_per_token_source"] == 384 and r["kv_values_per_token"] == 60
    assert r["kv_ratio"] == pytest.approx(6.4) and r["distill_tokens"] == 0
    assert r["kv_bytes_per_token_source"] / r["kv_bytes_per_token"] == pytest.approx(6.4)  # measured in generate
    # 227.45 vs the source's 20.52 here (a ratio of 11.09; the same to 1e-6 under no-SIMD kernels): the
    # calibration is deterministic, so 5% covers other kernels. Weight-SVD keys and values (--kv-init svd)
    # give 19754, i.e. a broken calibration fails by far.
    assert r["ppl_source"] < r["ppl_converted"] < 1.05 * 11.09 * r["ppl_source"]
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
    # bit for bit: the same files through the same loader (transformers copies weights into fresh memory) and
    # the same modeling code (the remote copy is modeling_mla.py itself), so the same kernels on the same values
    assert m.generate(**x, max_new_tokens=6, do_sample=False)[0].tolist() == got["tokens"]


@pytest.mark.numerics
def test_real_deepseek_v3_export_runs_in_stock_transformers(tmp_path, capsys):
    """SmolLM2 in DeepSeek-V3 form at the CLI's default shape (kv_lora_rank 32 + RoPE 32, 6.0x: the cache row
    llama.cpp's kernels like): the CLI writes a checkpoint that transformers loads with no remote code
    (DeepseekV3ForCausalLM) and that computes our MLA model's logits and greedy tokens."""
    out = tmp_path / "ds"
    assert main(["convert", "mla", "--model", "smollm2-135m", "--format", "deepseek_v3",
                 "--calib-tokens", "4096", "--max-tokens", "512", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["architecture"] == "DeepseekV3ForCausalLM" and r["kv_values_per_token"] == 64
    assert (r["kv_lora_rank"], r["qk_rope_head_dim"]) == (32, 32) and r["kv_ratio"] == 6.0
    # the reloaded export's logits are within REAL_FP32_RTOL * max|logit| of ours, and a token's NLL (a log-softmax)
    # moves by at most 2 max|dlogit|: 2 * 1e-5 * ~40 (SmolLM2's largest logits) = 8e-4 in mean NLL, so in ppl too
    assert r["ppl_exported"] == pytest.approx(r["ppl_converted"], rel=1e-3)
    assert "ppl_before_folding" in r      # the default keeps no latent norms; the export folds identity ones in
    assert not list(out.glob("*.py")) and "auto_map" not in (out / "config.json").read_text()
    assert "llama.cpp" in (out / "README.md").read_text()
    got = run_without_hf_ext(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float64).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        x = tok("def fibonacci(n):", return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            o = m.generate(x, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
        print(json.dumps({{"cls": type(m).__name__, "x": x.tolist(), "tokens": o.sequences[:, x.shape[1]:].tolist(),
                          "logits": [s.tolist() for s in o.logits]}}))
    """)
    assert got["cls"] == "DeepseekV3ForCausalLM"
    model, tok = load_causal_lm("smollm2-135m")
    mla, _ = upcycle_to_mla(model, UpcycleConfig(kv_lora_rank=32, qk_rope_head_dim=32, target="deepseek_v3"),
                            calib_ids=tokenize(tok, load_corpus("python-docs:train"), 4096), progress=False)
    mla = fold_identity_latents(mla)                  # what the CLI exports (test_mla_export.py checks the fold)
    # In float64 the two graphs' arithmetic rounding (~1e-16) vanishes, and what is left is the export's own fp32
    # weight rounding: q_b carries the softmax-scale ratio and RoPE rows are permuted, so each weight is ours
    # within U32 relative. REAL_FP32_RTOL * max|logit| bounds the logit change of fp32-sized perturbations
    # through fan-in 1536 and 30 layers (tests/numerics.py). In float32 the two graphs (absorbed query latent
    # and norms ordered differently) measured 4.2e-4 apart under AVX2 + MKL_CBWR=COMPATIBLE: arithmetic, not the
    # export; the fp32 comparison is made on tiny models (test_mla_export.py, within TINY_FP32_ATOL).
    logits, tokens = greedy(mla.double(), torch.tensor(got["x"]), max_new_tokens=8)
    atol = REAL_FP32_RTOL * max(float(s.abs().max()) for s in logits)
    assert_greedy_agrees([torch.tensor(s, dtype=torch.float64) for s in got["logits"]], torch.tensor(got["tokens"]), logits,
                         tokens, atol, min_steps=6)


@pytest.mark.numerics
def test_real_static_cache_and_compiled_decode_equal_the_dynamic_eager_ones(smollm2):
    from transformers import StaticCache

    model, tok = smollm2
    calib = tokenize(tok, load_corpus("python-docs:train"), 2048)
    mla, _ = upcycle_to_mla(model, UpcycleConfig(kv_ratio=6.4), calib_ids=calib, progress=False)
    prompt = torch.tensor([tok("def fibonacci(n):", add_special_tokens=False)["input_ids"]])
    dyn = greedy(mla, prompt, max_new_tokens=12)
    sta = greedy(mla, prompt, max_new_tokens=12, cache_implementation="static")
    atol = REAL_FP32_RTOL * float(torch.stack(dyn[0]).abs().max())   # fp32 rounding of the same sums
    assert_greedy_agrees(*sta, *dyn, atol, min_steps=10)
    x, new = prompt, tokenize(tok, load_corpus("python-docs:eval"), 6)[None]
    torch._dynamo.reset()
    step = torch.compile(mla.forward, fullgraph=True)
    runs = []
    with torch.no_grad():
        for fn in (mla.forward, step):
            cache = StaticCache(config=mla.config, max_cache_len=32)
            mla(x, cache=cache, use_cache=True)
            runs.append(torch.stack([fn(input_ids=new[:, t:t + 1], cache=cache, use_cache=True,
                                        position_ids=torch.full((1, 1), x.shape[1] + t)).logits[:, -1]
                                     for t in range(new.shape[1])]))
    # inductor reorders and fuses the fp32 sums: rounding of the same computation (tests/numerics.py)
    assert_close_rel(runs[1], runs[0], REAL_FP32_RTOL)
