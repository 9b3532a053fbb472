"""MLA as a stock DeepSeek-V3 checkpoint: loads with transformers and no remote code, equals our model."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_causal_lm
from helpers import run_without_hf_ext
from hf_ext.mla import ExportError, UpcycleConfig, export_deepseek_v3, save_deepseek_v3, upcycle_to_mla
from hf_ext.mla.ops import best_rope_stride
from numerics import TINY_FP32_ATOL, assert_greedy_agrees, greedy

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

DEEPSEEK = dict(kv_ratio=2, qk_rope_head_dim=4, target="deepseek_v3")


def calib(n=2048):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(1))


def source(family):
    return tiny_causal_lm(family, **({"sliding_window": None} if family == "mistral" else {}))


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("init", ["gain", "eps"])
def test_export_loads_without_hf_ext_and_equals_our_model(tmp_path, family, init):
    mla, report = upcycle_to_mla(source(family), UpcycleConfig(**DEEPSEEK, latent_norm_init=init), calib_ids=calib(),
                                 progress=False)
    save_deepseek_v3(mla, tmp_path / "ds")
    files = {p.name for p in (tmp_path / "ds").iterdir()}
    cfg = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert not [f for f in files if f.endswith(".py")] and "auto_map" not in cfg
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] and cfg["q_lora_rank"] == 32
    x = torch.randint(0, 128, (2, 20))
    got = run_without_hf_ext(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ds')!r}).eval()
        x = torch.tensor({x.tolist()})
        with torch.no_grad():
            out = m.generate(x[:1, :9], max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
            print(json.dumps({{"cls": type(m).__name__, "logits": m(x).logits.tolist(),
                              "gen_logits": [s.tolist() for s in out.logits], "tokens": out.sequences[:, 9:].tolist()}}))
    """)
    assert got["cls"] == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        want = mla(x).logits
    # The same computation up to the order of some sums and RoPE angles computed as theta'^(-2j/d_r) there
    # and theta^(-2cj/D) here (equal in exact arithmetic, a few float32 ulps apart): tests/numerics.py
    assert torch.allclose(torch.tensor(got["logits"]), want, atol=TINY_FP32_ATOL, rtol=0)
    assert_greedy_agrees([torch.tensor(s) for s in got["gen_logits"]], torch.tensor(got["tokens"]),
                         *greedy(mla, x[:1, :9], max_new_tokens=8), TINY_FP32_ATOL, min_steps=6)


def test_eps_init_makes_the_latent_norms_the_identity():
    """With the norm's epsilon dominating, the DeepSeek-form model equals the same upcycling without the
    norms and the query latent (to the 1e-6 relative error the init targets, far inside TINY_FP32_ATOL)."""
    src, x = tiny_causal_lm("llama"), torch.randint(0, 128, (2, 20))
    free, rep = upcycle_to_mla(src, UpcycleConfig(kv_ratio=2, qk_rope_head_dim=4, rope_selection="geometric"),
                               calib_ids=calib(), progress=False)
    ds, _ = upcycle_to_mla(src, UpcycleConfig(**DEEPSEEK, latent_norm_init="eps"), calib_ids=calib(), progress=False)
    gain, _ = upcycle_to_mla(src, UpcycleConfig(**DEEPSEEK), calib_ids=calib(), progress=False)
    with torch.no_grad():
        want = free(x).logits
        assert torch.allclose(ds(x).logits, want, atol=TINY_FP32_ATOL, rtol=0)
        assert float((gain(x).logits - want).abs().max()) > 10 * TINY_FP32_ATOL   # the active norm does change it
    assert ds.config.q_lora_rank == 32 and ds.config.latent_norm and not free.config.latent_norm


def test_geometric_rope_frequencies_are_one_stride_in_every_layer():
    src = tiny_causal_lm("llama", tie_word_embeddings=True)                # tied, as SmolLM2
    mla, report = upcycle_to_mla(src, UpcycleConfig(**DEEPSEEK), calib_ids=calib(), progress=False)
    c = report["rope_stride"]
    assert all(idx == [[0, c]] for idx in mla.config.rope_freq_index)
    cfg, sd = export_deepseek_v3(mla)
    theta = mla.config.rope_parameters["rope_theta"]
    assert cfg.rope_parameters["rope_theta"] == pytest.approx(theta ** (c * 4 / 8), rel=1e-12)
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])   # written out for untied engines


def test_best_rope_stride_by_hand():
    # 8 frequencies, 2 components, 3 kept pairs: stride 1 keeps 0,1,2; stride 2 keeps 0,2,4; stride 3 keeps 0,3,6
    s = torch.zeros(8, 2, dtype=torch.float64)
    s[0, 0], s[3, 1], s[6, 0], s[1, 0] = 5, 4, 4, 1
    assert best_rope_stride([s], 3) == 3
    s2 = s.clone()
    s2[2, 1], s2[1, 0] = 9, 9
    assert best_rope_stride([s2], 3) == 1


@pytest.mark.parametrize("family, kw, needle", [
    ("qwen2", {}, "biases"),
    ("qwen3", {}, "qk_norm"),
    ("llama", {"rope_key_sharing": "per_kv_head", "rope_rotation": "none"}, "one RoPE key shared"),
    ("llama", {"rope_selection": "2norm"}, "rope_selection='2norm'"),
])
def test_sources_without_a_deepseek_equivalent_are_refused(family, kw, needle):
    with pytest.raises(ExportError, match=needle):
        upcycle_to_mla(tiny_causal_lm(family), UpcycleConfig(**DEEPSEEK, **kw), calib_ids=calib(), progress=False)
    with pytest.raises(ExportError, match="sliding window"):
        upcycle_to_mla(tiny_causal_lm("mistral", sliding_window=8), UpcycleConfig(**DEEPSEEK), calib_ids=calib(),
                       progress=False)


def test_an_hf_ext_mla_model_names_the_fix():
    mla, _ = upcycle_to_mla(tiny_causal_lm("llama"), UpcycleConfig(kv_ratio=2, qk_rope_head_dim=4), calib_ids=calib(),
                            progress=False)
    with pytest.raises(ExportError, match="target='deepseek_v3'"):
        export_deepseek_v3(mla)


def test_engine_latent_dims_fill_whole_simd_steps_at_the_ratio():
    """The CLI's DeepSeek default: a cache row that is a multiple of 64, >= 6x smaller than K+V, r whole q8_0 blocks."""
    from types import SimpleNamespace

    from hf_ext.mla.export import engine_latent_dims

    cfg = lambda kv, hd: SimpleNamespace(num_key_value_heads=kv, head_dim=hd, hidden_size=576, num_attention_heads=9)
    assert engine_latent_dims(cfg(3, 64)) == (32, 32)                  # SmolLM2: 384 values -> 64 = 32 + 32
    assert engine_latent_dims(cfg(8, 128)) == (288, 32)                # Llama-3-8B: 2048 / 6 = 341 -> 320
    assert engine_latent_dims(cfg(8, 128), rope_dim=64) == (256, 64)
    with pytest.raises(ExportError, match="--kv-lora-rank and --rope-dim"):
        engine_latent_dims(cfg(2, 16))                                 # 64 values: no 64-wide row is 6x smaller
