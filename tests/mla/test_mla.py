"""MLA: ops vs naive, lossless upcycling, absorbed == expanded, the latent cache in generate, save/load."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_causal_lm
from hf_ext.mla import MLAForCausalLM, UpcycleConfig, UpcycleError, latent_cache_bytes, ops, upcycle_to_mla
from helpers import run_without_hf_ext
from numerics import (OPS_FP64_ATOL, ROUND_TRIP_RTOL64, TINY_FP32_ATOL, assert_close_rel, assert_greedy_agrees,
                      assert_round_trip, greedy)

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
LOSSY = dict(kv_ratio=2, qk_rope_head_dim=4)  # tiny: 16 cached values vs the source's 32 (r = 12 on Llama)


def calib(n=2048):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(1))


def upcycle(family="llama", **kw):
    src = tiny_causal_lm(family)
    uc = UpcycleConfig.lossless(src.config) if not kw else UpcycleConfig(**kw)
    mla, report = upcycle_to_mla(src, uc, calib_ids=calib(), progress=False)
    return src, mla, report


# ---------------------------------------------------------------------------------------------- ops
def test_absorbed_attention_equals_naive():
    g = torch.Generator().manual_seed(0)
    H, T, S, d_n, d_r, d_v, r = 3, 4, 7, 5, 4, 6, 8
    args = [torch.randn(*s, generator=g, dtype=torch.float64) for s in
            [(H, T, d_n), (H, T, d_r), (S, r), (S, d_r), (H, d_n, r), (H, d_v, r)]]
    a, b = ops.mla_attention_naive(*args, 0.3), ops.mla_attention_absorbed(*args, 0.3)
    assert a.shape == (T, H, d_v) and torch.allclose(a, b, atol=OPS_FP64_ATOL, rtol=0)


def test_rorope_rotation_commutes_with_rope():
    g = torch.Generator().manual_seed(0)
    n_kv, D, T = 3, 8, 5
    k = torch.randn(T, n_kv * D, generator=g, dtype=torch.float64)        # pre-RoPE keys of all heads
    R, energy = ops.rorope_rotation(k.T @ k / T, n_kv, D)
    Tm = ops.rotation_matrix(R, n_kv, D)
    assert torch.allclose(Tm @ Tm.T, torch.eye(n_kv * D, dtype=torch.float64), atol=OPS_FP64_ATOL, rtol=0)
    assert (energy[:, :-1] >= energy[:, 1:]).all()                         # components sorted by energy
    cos, sin = ops.rope_cos_sin(1.0 / 100 ** (torch.arange(0, D, 2) / D), torch.arange(T))
    rope = lambda x: ops.apply_rope_naive(x.view(T, n_kv, D).transpose(0, 1), cos, sin).transpose(0, 1).reshape(T, -1)  # noqa: E731
    assert torch.allclose(rope(k @ Tm.T), rope(k) @ Tm.T, atol=OPS_FP64_ATOL, rtol=0)


@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_lowrank_full_rank_is_exact_and_truncation_is_optimal(weighted):
    g = torch.Generator().manual_seed(0)
    M, X = torch.randn(10, 16, generator=g, dtype=torch.float64), torch.randn(200, 16, generator=g, dtype=torch.float64)
    C = X.T @ X / 200
    Dw = torch.diag(torch.rand(10, generator=g, dtype=torch.float64) + 0.5) if weighted else None
    up, down, ev = ops.weighted_lowrank(M, C, 10, Dw)
    assert torch.allclose(up @ down, M, atol=1e-10, rtol=0)   # float64, through an eigendecomposition of C:
    # its backward error is ~ n U64 ||C|| / (smallest eigenvalue ~ 1e-2 here) = 1e-13, 1000x below 1e-10
    up, down, ev = ops.weighted_lowrank(M, C, 4, Dw)
    W = Dw if weighted else torch.eye(10, dtype=torch.float64)
    err = lambda A: (W @ (M - A) @ C @ (M - A).T @ W.T).trace()  # noqa: E731
    assert err(up @ down) == pytest.approx(ev[4:].sum().item(), rel=1e-8)  # the discarded eigenvalues (float64,
    # the same eigendecomposition's rounding, ~1e-13 relative; 1e-8 leaves room for ill-separated eigenvalues)
    assert err(up @ down) < err(torch.linalg.svd(M, full_matrices=False)[0][:, :4] @ torch.linalg.svd(M, full_matrices=False)[0][:, :4].T @ M) + 1e-9


# ----------------------------------------------------------------------------------------- upcycle
@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_upcycle_reproduces_source(family):
    src, mla, report = upcycle(family)
    x = torch.randint(0, 128, (2, 33))
    with torch.no_grad():
        assert torch.allclose(mla(x).logits, src(x).logits, atol=TINY_FP32_ATOL, rtol=0)   # see tests/numerics.py
    # Qwen3 (qk_norm) also caches one key scale per KV head and token
    assert report["kv_values_per_token"] == report["kv_values_per_token_source"] + (2 if family == "qwen3" else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_generate_matches_source(family):
    src, mla, _ = upcycle(family)
    x = torch.randint(0, 128, (1, 9))
    assert_greedy_agrees(*greedy(src, x, max_new_tokens=12), *greedy(mla, x, max_new_tokens=12), TINY_FP32_ATOL,
                         min_steps=8)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_position_free_keys_are_exact_when_their_pairs_do_not_rotate(family):
    """Half the pairs leave RoPE and go through the latent (full rank). With rope_theta 1e12 those slow
    pairs rotate < 1e-5 rad over 33 tokens, so the model must match the source: this checks the
    position-free key path, including Qwen3's cached per-head key scale (at theta 1e4 it is off by 1e-2)."""
    src = tiny_causal_lm(family, rope_parameters={"rope_type": "default", "rope_theta": 1e12})
    uc = UpcycleConfig(kv_lora_rank=24, qk_rope_head_dim=4, rope_key_sharing="per_kv_head", rope_rotation="none",
                       rope_selection="high_freq", kv_init="svd", nope_rotation="none")
    mla, report = upcycle_to_mla(src, uc, progress=False)
    assert mla.config.qk_nope_head_dim == 8                                 # 2 kv heads x 2 slow pairs x 2 dims
    x = torch.randint(0, 128, (2, 33))
    with torch.no_grad():   # the slow pairs' rotation (< 1e-5 rad, times logits of O(1)) is the only change
        assert torch.allclose(mla(x).logits, src(x).logits, atol=TINY_FP32_ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("sharing", ["shared", "per_kv_head"])
def test_absorbed_decode_equals_expanded(sharing, family):
    _, mla, _ = upcycle(family, rope_key_sharing=sharing, **LOSSY)
    x = torch.randint(0, 128, (2, 20))
    logits = {}
    for mode in ("always", "never"):
        mla.config.absorb = mode
        with torch.no_grad():
            out = mla(x[:, :12], use_cache=True)
            steps = [out.logits[:, -1]]
            for t in range(12, 20):
                out = mla(x[:, t:t + 1], cache=out.cache, use_cache=True)
                steps.append(out.logits[:, -1])
        logits[mode] = torch.stack(steps)
    assert torch.allclose(logits["always"], logits["never"], atol=TINY_FP32_ATOL, rtol=0)   # tests/numerics.py


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_absorbed_matches_expanded_and_cache_is_latent(family):
    _, mla, _ = upcycle(family, **LOSSY)
    x = torch.randint(0, 128, (2, 10))
    mla.config.absorb = "auto"
    out = mla.generate(x, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    mla.config.absorb = "never"
    assert_greedy_agrees(out.logits, out.sequences[:, 10:], *greedy(mla, x, max_new_tokens=8), TINY_FP32_ATOL,
                         min_steps=6)
    cfg, T = mla.config, out.sequences.shape[1] - 1                         # the last token is never cached
    assert type(out.cache.layers[0]).__name__ == "MLALatentLayer"
    assert latent_cache_bytes(out.cache) == cfg.num_hidden_layers * 2 * T * cfg.kv_values_per_token * 4
    # vs 2 * 2 * 8 = 32 in the source; Qwen3 caches its 2 key scales too, in place of 2 latent values
    assert cfg.kv_values_per_token == 16 and cfg.kv_lora_rank == (10 if family == "qwen3" else 12)


def test_left_padded_batch_matches_single_rows():
    _, mla, _ = upcycle(**LOSSY)
    a, b = torch.randint(1, 128, (1, 11)), torch.randint(1, 128, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    logits, tokens = greedy(mla, batch, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    # a padded row computes the same sums as the row alone, with masked terms that are exactly 0, but in
    # other tensor shapes, so the logits agree to TINY_FP32_ATOL (tests/numerics.py), not bit for bit
    for row, alone in ((0, a), (1, b)):
        assert_greedy_agrees([x[row:row + 1] for x in logits], tokens[row:row + 1],
                             *greedy(mla, alone, max_new_tokens=6), TINY_FP32_ATOL, min_steps=4)


def test_cache_crop_then_continue():
    _, mla, _ = upcycle(**LOSSY)
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        cache = mla(x, use_cache=True).cache
        cache.crop(-6)                                                      # drop the last 6 of 16
        assert cache.get_seq_length() == 10 and cache.layers[0].keys.shape[2] == 10
        step = mla(x[:, 10:11], cache=cache, use_cache=True).logits[:, -1]
        ref = mla(x[:, :11]).logits[:, -1]
    assert torch.allclose(step, ref, atol=TINY_FP32_ATOL, rtol=0)   # cached vs recomputed: tests/numerics.py


def test_beam_search_absorbed_equals_expanded():
    _, mla, _ = upcycle(**LOSSY)
    x = torch.randint(0, 128, (2, 7))
    mla.config.absorb = "auto"
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False, return_dict_in_generate=True,
              output_scores=True)
    a = mla.generate(x, **kw)
    mla.config.absorb = "never"
    b = mla.generate(x, **kw)
    # the beams' scores are sums of log-probs that agree to TINY_FP32_ATOL per step: the same beams win as
    # long as no two candidates' scores are closer than that, which the kept beams' spread shows here
    assert torch.allclose(a.sequences_scores, b.sequences_scores, atol=6 * TINY_FP32_ATOL, rtol=0)
    assert float(a.sequences_scores.view(2, 3).diff(dim=1).abs().min()) > 12 * TINY_FP32_ATOL
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_save_load_round_trip_and_remote_code(tmp_path, family):
    _, mla, _ = upcycle(family, **LOSSY)
    mla.save_pretrained(tmp_path)
    x = torch.randint(0, 128, (1, 12))
    logits = lambda m: m(x).logits  # noqa: E731
    with torch.no_grad():
        assert_round_trip(MLAForCausalLM.from_pretrained(tmp_path).eval(), mla, logits)
        # loaded as float64 like the remote side: buffers made at init (RoPE) are then float64 on both
        want = logits(MLAForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval())
    assert (tmp_path / "modeling_mla.py").exists()
    got = run_without_hf_ext(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True, dtype=torch.float64).eval()
        x = torch.tensor({x.tolist()})
        out = m.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        print(json.dumps({{"logits": m(x).logits.tolist(), "cls": type(m).__name__,
                          "layer": type(out.cache.layers[0]).__name__}}))
    """)
    assert got["cls"] == "MLAForCausalLM" and got["layer"] == "MLALatentLayer"
    assert_close_rel(torch.tensor(got["logits"], dtype=torch.float64), want, ROUND_TRIP_RTOL64)   # float64 both sides


# --------------------------------------------------------------------------------------- bad input
def test_unsupported_model_type_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(UpcycleError, match="supported: llama, mistral, qwen2, qwen3"):
        upcycle_to_mla(gpt2, UpcycleConfig(kv_ratio=2))


@pytest.mark.parametrize("kw, needle", [
    (dict(kv_lora_rank=999), "above the maximum"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=3), "even width"),
    (dict(kv_ratio=1.0), "does not compress"),
    (dict(kv_ratio=2, kv_lora_rank=4), "exactly one"),
    (dict(kv_ratio=2, rope_key_sharing="per_kv_head", rope_rotation="rorope"), "rope_rotation='none'"),
])
def test_bad_upcycle_config(kw, needle):
    with pytest.raises(UpcycleError, match=needle):
        upcycle_to_mla(tiny_causal_lm(), UpcycleConfig(**{"qk_rope_head_dim": 4, **kw}), calib_ids=calib())


def test_rorope_on_qk_norm_source_says_why():
    with pytest.raises(UpcycleError, match="normalises each key head"):
        upcycle_to_mla(tiny_causal_lm("qwen3"), UpcycleConfig(kv_ratio=2, qk_rope_head_dim=4, rope_rotation="rorope"),
                       calib_ids=calib())


def test_short_calibration_says_how_much():
    with pytest.raises(UpcycleError, match="at least 64"):
        upcycle_to_mla(tiny_causal_lm(), UpcycleConfig(kv_ratio=2, qk_rope_head_dim=4), calib_ids=calib(20))
