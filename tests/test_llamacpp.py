"""llama.cpp as a real outside engine: the pinned build, GGUF conversion with its own converter, and its
perplexity and KV cache for SmolLM2 and for SmolLM2's MLA DeepSeek-V3 export, next to our own figures."""
from __future__ import annotations

import math

import pytest
import torch

from conversion.cli import main
from hf_ext import llamacpp
from hf_ext.errors import BadTextError
from hf_ext.eval import llamacpp_protocol_perplexity
from hf_ext.llamacpp import LlamaCppError, LlamaCppMissingError


# ------------------------------------------------------------------------------------------------ fast
def test_missing_build_names_the_build_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_EXT_CACHE", str(tmp_path))
    with pytest.raises(LlamaCppMissingError, match="hf-ext llamacpp build"):
        llamacpp.ensure_llamacpp()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LlamaCppMissingError, match="hf-ext llamacpp build"):
        llamacpp.convert_to_gguf(tmp_path, tmp_path / "x.gguf")
    assert main(["llamacpp", "where"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no llama.cpp build at") and "hf-ext llamacpp build" in err[0]
    assert not list(tmp_path.glob("*.gguf*"))


def test_bad_conversion_input_is_refused_before_any_work(tmp_path):
    with pytest.raises(LlamaCppError, match="no config.json"):
        llamacpp.convert_to_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(LlamaCppError, match="outtype 'q3'"):
        llamacpp.convert_to_gguf(tmp_path, tmp_path / "x.gguf", outtype="q3")


def test_kv_cache_line_is_parsed_and_its_absence_is_an_error():
    log = ("llama_kv_cache:        CPU KV buffer size =    56.25 MiB\n"
           "llama_kv_cache: size =   56.25 MiB ( 16384 cells,  30 layers,  1/1 seqs), K (f16):   56.25 MiB\n")
    assert llamacpp.parse_kv_mib(log) == 56.25
    with pytest.raises(LlamaCppError, match="llama_kv_cache: size"):
        llamacpp.parse_kv_mib("llama_model_load: error loading model\n")


class _Tok:
    """A character tokenizer that adds BOS (id 1), like tokenizers whose GGUF has add_bos_token."""
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + [2 + ord(c) % 30 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors else ids}


def test_llamacpp_protocol_perplexity_by_hand(tiny_llama):
    """Chunks of n_ctx with BOS in front of each, only the second half scored: recomputed here token by token."""
    model = tiny_llama.eval()
    text, n_ctx = "the quick brown fox jumps over the lazy dog " * 3, 16
    got = llamacpp_protocol_perplexity(model, _Tok(), text, n_ctx=n_ctx)
    ids = _Tok()(text)["input_ids"]
    nll, n = 0.0, 0
    for c in range(len(ids) // n_ctx):
        x = torch.tensor([1] + ids[c * n_ctx + 1:(c + 1) * n_ctx])
        with torch.no_grad():
            logp = model(input_ids=x[None]).logits[0].double().log_softmax(-1)
        for t in range(n_ctx // 2, n_ctx - 1):
            nll -= logp[t, x[t + 1]].item()
            n += 1
    assert got["n_chunks"] == len(ids) // n_ctx and got["scored_tokens"] == n
    # the same sums in fp32 (one cross_entropy) vs float64 per token: relative 1e-6 of an NLL of ~log(V)
    assert got["nll"] == pytest.approx(nll / n, rel=1e-6)
    with pytest.raises(BadTextError, match="at least 2 x n_ctx = 64"):
        llamacpp_protocol_perplexity(model, _Tok(), "short", n_ctx=32)


# ------------------------------------------------------------------------------------------------ real
@pytest.fixture(scope="module")
def llamacpp_build():
    """The pinned llama.cpp, built once outside the clone (about 6 minutes on 2 cores the first time)."""
    return llamacpp.ensure_llamacpp(build=True)


@pytest.fixture(scope="module")
def ggufs(llamacpp_build, tmp_path_factory):
    from hf_ext.eval import tokenize
    from hf_ext.mla import UpcycleConfig, save_deepseek_v3, upcycle_to_mla
    from hf_ext.mla.export import engine_latent_dims
    from hf_ext.zoo import load_causal_lm, load_corpus, resolve_model

    work = tmp_path_factory.mktemp("llamacpp")
    model, tok = load_causal_lm("smollm2-135m")
    r, d_r = engine_latent_dims(model.config)           # the CLI's DeepSeek default: 32 + 32 (6.0x)
    mla, rep = upcycle_to_mla(model, UpcycleConfig(kv_lora_rank=r, qk_rope_head_dim=d_r, target="deepseek_v3"),
                              calib_ids=tokenize(tok, load_corpus("python-docs:train"), 4096), progress=False)
    folders = {"source": resolve_model("smollm2-135m"), "mla": save_deepseek_v3(mla, work / "mla", tokenizer=tok)}
    text = work / "eval.txt"
    text.write_text(load_corpus("python-docs:eval", max_chars=40000))
    out = {"text": text, "rep": rep, "folders": folders}
    for name, folder in folders.items():
        for t in ("f32", "f16"):
            out[name, t] = llamacpp.convert_to_gguf(folder, work / f"{name}.{t}.gguf", t)
    return out


@pytest.mark.real
@pytest.mark.parametrize("name", ["source", "mla"])
def test_real_llamacpp_perplexity_equals_ours_on_the_same_weights(ggufs, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ggufs["folders"][name]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n_ctx, chunks = 256, 6
    ours = llamacpp_protocol_perplexity(model, tok, ggufs["text"].read_text(), n_ctx, chunks)
    f32 = llamacpp.llamacpp_perplexity(ggufs[name, "f32"], ggufs["text"], n_ctx, n_chunks=chunks, f32_cache=True)
    f16 = llamacpp.llamacpp_perplexity(ggufs[name, "f16"], ggufs["text"], n_ctx, n_chunks=chunks)
    assert f32["n_chunks"] == f16["n_chunks"] == ours["n_chunks"] == chunks      # same tokens, same chunks
    # fp32 weights and cache: the same model in two fp32 implementations. A token's NLL moves by at most
    # 2 max|dlogit|; blocking gives dlogit <= REAL_FP32_RTOL * max|logit| ~ 4e-4 (tests/numerics.py), and
    # llama.cpp's RoPE angles (p * theta^(-2i/d) built by i successive fp32 products) are off by up to
    # p * (d/2 + 1) * U32 <= 255 * 33 * 6e-8 = 5e-4 rad, a relative change of that size in each rotated q.k.
    # Both average over ~800 scored tokens; 2e-3 of the mean NLL (~2.5) is ~5e-3 absolute, above both.
    assert abs(math.log(f32["ppl"] / ours["ppl"])) < 2e-3 * math.log(ours["ppl"])
    # f16 weights, activations and cache (unit roundoff 2^-11 = 4.9e-4): the goal is within 1%
    assert f16["ppl"] == pytest.approx(ours["ppl"], rel=0.01)


@pytest.mark.real
def test_real_llamacpp_kv_cache_of_the_export_is_the_latent(ggufs):
    """llama.cpp's own allocation at 16k: the source caches 2 x 3 KV heads x 64 values per token and layer, the
    export one latent of kv_lora_rank + rope dims (32 + 32 at the CLI's default), both f16."""
    L, n_ctx, f16 = 30, 16384, 2
    src = llamacpp.llamacpp_kv_cache_mib(ggufs["source", "f16"], n_ctx)
    mla = llamacpp.llamacpp_kv_cache_mib(ggufs["mla", "f16"], n_ctx)
    assert src == L * 2 * 3 * 64 * n_ctx * f16 / 2 ** 20 == 360.0
    assert mla == L * ggufs["rep"]["kv_values_per_token"] * n_ctx * f16 / 2 ** 20
    assert src / mla >= 6.0
