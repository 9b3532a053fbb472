"""MLA as a stock DeepSeek-V3 checkpoint: loads with transformers and no remote code, equals our model."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_causal_lm
from helpers import run_without_hf_ext
from hf_ext.mla import ExportError, UpcycleConfig, export_deepseek_v3, save_deepseek_v3, upcycle_to_mla
from hf_ext.mla.export import DEEPSEEK_LATENT_EPS, IDENTITY_RHO, INPUT_SCALE, fold_identity_latents, identity_latents
from hf_ext.mla.ops import best_rope_stride
from numerics import TINY_FP32_ATOL, assert_greedy_agrees, greedy

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

DEEPSEEK = dict(kv_ratio=2, qk_rope_head_dim=4, target="deepseek_v3")


def calib(n=2048):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(1))


def source(family):
    return tiny_causal_lm(family, **({"sliding_window": None} if family == "mistral" else {}))


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("init", ["identity", "gain"])
def test_export_loads_without_hf_ext_and_equals_our_model(tmp_path, family, init):
    mla, report = upcycle_to_mla(source(family), UpcycleConfig(**DEEPSEEK, latent_norm_init=init), calib_ids=calib(),
                                 progress=False)
    assert mla.config.latent_norm == (init == "gain") and mla.config.rms_norm_eps == DEEPSEEK_LATENT_EPS
    if init == "identity":     # what the export writes (test_fold_* checks the fold itself)
        mla = fold_identity_latents(mla)
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


def identity_source():
    """A llama whose first attention input norm has a gain far below float16's smallest normal (as SmolLM2's
    2e-4, only smaller), so that the query latent needs its k > 1 (``export.query_latent``)."""
    src = tiny_causal_lm("llama")
    with torch.no_grad():
        src.model.layers[0].input_layernorm.weight[:3] = torch.tensor([1e-7, -3e-5, 2e-4])
    return src


def test_fold_is_the_model_without_latents_when_rho_is_negligible():
    """At rho = 1e-10 the folded norm is the identity to 5e-11: what is left is the algebra (input scale beta,
    query latent x_hat / k and its compensated gain, RoPE rows x 1/beta, latent rows x alpha, norm gain
    sqrt(eps) / (alpha beta)), which must hold to float32 rounding, TINY_FP32_ATOL."""
    free, _ = upcycle_to_mla(identity_source(), UpcycleConfig(**DEEPSEEK), calib_ids=calib(), progress=False)
    folded = fold_identity_latents(free, rho=1e-10)
    assert folded.config.latent_norm and folded.config.q_lora_rank == 32 and not free.config.latent_norm
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.allclose(folded(x).logits, free(x).logits, atol=TINY_FP32_ATOL, rtol=0)
    gain, _ = upcycle_to_mla(identity_source(), UpcycleConfig(**DEEPSEEK, latent_norm_init="gain"), calib_ids=calib(),
                             progress=False)
    with torch.no_grad():      # an active norm does change the model: the comparison can fail
        assert float((gain(x).logits - free(x).logits).abs().max()) > 10 * TINY_FP32_ATOL


@torch.no_grad()
def test_folded_kv_norm_stays_within_its_bound_and_reaches_it():
    """identity_latents promises n(c') = c * s_t with s_t in [(1 + rho)^-1/2, 1] for *every* attention input
    beta * g * x_hat (|x_hat|^2 = h): the bound sigma^2 h of |c|^2 is reached by x_hat along the top right
    singular vector of W_c diag(g), so that input must give s = (1 + rho)^-1/2 exactly (float64), and random
    and adversarially large inputs must stay inside."""
    free, _ = upcycle_to_mla(identity_source(), UpcycleConfig(**DEEPSEEK), calib_ids=calib(), progress=False)
    free.double()
    sd, r = free.state_dict(), free.config.kv_lora_rank
    for layer in range(free.config.num_hidden_layers):
        lat = identity_latents(sd, f"model.layers.{layer}.", r, eps=DEEPSEEK_LATENT_EPS)
        W_c = sd[f"model.layers.{layer}.self_attn.kv_a_proj.weight"][:r]            # (r, h), the model's own
        g = lat[f"model.layers.{layer}.input_layernorm.weight"] / INPUT_SCALE       # the clamped gains
        h = g.numel()
        top = torch.linalg.svd(W_c * g[None]).Vh[0]                                 # unit, along the bound
        x_hat = torch.cat([top[None] * h ** 0.5, torch.randn(64, h, dtype=torch.float64),
                           torch.randn(64, h, dtype=torch.float64) * torch.rand(64, 1, dtype=torch.float64) * 10])
        x_hat = x_hat / x_hat.pow(2).mean(-1, keepdim=True).sqrt()                  # |x_hat|^2 = h, as after RMSNorm
        c = x_hat @ (W_c * g[None]).T                                               # without latents
        c_fold = (lat[f"model.layers.{layer}.input_layernorm.weight"] * x_hat) @ \
            lat[f"model.layers.{layer}.self_attn.kv_a_proj.weight"][:r].T
        w = lat[f"model.layers.{layer}.self_attn.kv_a_layernorm.weight"]
        n = w * c_fold / (c_fold.pow(2).mean(-1, keepdim=True) + DEEPSEEK_LATENT_EPS).sqrt()
        s = n.norm(dim=-1) / c.norm(dim=-1)
        lo = (1 + IDENTITY_RHO) ** -0.5
        assert float(s[0]) == pytest.approx(lo, rel=1e-9)
        assert bool((s >= lo * (1 - 1e-12)).all() and (s <= 1 + 1e-12).all())
        assert torch.allclose(n / s[:, None], c, rtol=1e-9, atol=1e-12)             # a scale, no rotation


def test_folded_weights_and_inputs_are_normal_float16_numbers():
    """The fold moves c_kv's scale into the attention input (beta) and the latent rows (alpha) so that neither
    is a float16 subnormal: the largest latent row weight of every layer and the input norm's typical
    gain stay >= float16's smallest normal (2^-14), and no weight exceeds float16's largest (65504)."""
    from transformers import AutoConfig

    from hf_ext.mla.export import FP16_MIN_NORMAL

    src = tiny_causal_lm("llama")
    free, _ = upcycle_to_mla(src, UpcycleConfig(**DEEPSEEK), calib_ids=calib(), progress=False)
    cfg, sd = export_deepseek_v3(free)
    assert cfg.rms_norm_eps == DEEPSEEK_LATENT_EPS and isinstance(cfg, type(AutoConfig.for_model("deepseek_v3")))
    r = cfg.kv_lora_rank
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        assert float(sd[p + "self_attn.kv_a_proj_with_mqa.weight"][:r].abs().amax(1).min()) >= FP16_MIN_NORMAL
        assert float(sd[p + "input_layernorm.weight"].abs().median()) * 0.1 >= FP16_MIN_NORMAL
        assert max(float(v.abs().max()) for k, v in sd.items() if k.startswith(p)) < 65504


def test_a_model_without_latents_needs_deepseeks_norm_epsilon():
    free, _ = upcycle_to_mla(tiny_causal_lm("llama", rms_norm_eps=1e-5), UpcycleConfig(kv_ratio=2, qk_rope_head_dim=4,
                             rope_selection="geometric"), calib_ids=calib(), progress=False)    # target hf_ext: 1e-5
    with pytest.raises(ExportError, match="rms_norm_eps"):
        export_deepseek_v3(free)


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
