"""MLA's static latent cache: generate with cache_implementation="static", and a decode step that compiles."""
from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

from conftest import tiny_causal_lm
from hf_ext.mla import UpcycleConfig, latent_cache_bytes, upcycle_to_mla
from numerics import TINY_FP32_ATOL, assert_greedy_agrees

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

LOSSY = dict(kv_ratio=2, qk_rope_head_dim=4)


def upcycle(family="llama", **kw):
    calib = torch.randint(0, 128, (2048,), generator=torch.Generator().manual_seed(1))
    mla, _ = upcycle_to_mla(tiny_causal_lm(family), UpcycleConfig(**LOSSY, **kw), calib_ids=calib, progress=False)
    return mla


def generate(mla, x, **kw):
    return mla.generate(x, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True,
                        pad_token_id=0, **kw)


@pytest.mark.parametrize("family,kw", [("llama", {}), ("qwen3", {}), ("llama", {"rope_key_sharing": "per_kv_head"})])
def test_static_cache_generates_as_the_dynamic_one_and_holds_exactly_the_latents(family, kw):
    mla, x = upcycle(family, **kw), torch.randint(1, 128, (2, 10))
    dyn, sta = generate(mla, x), generate(mla, x, cache_implementation="static")
    # the same sums, with the static cache's unused slots masked to exact zeros of probability: tests/numerics.py
    assert_greedy_agrees(sta.logits, sta.sequences[:, 10:], dyn.logits, dyn.sequences[:, 10:], TINY_FP32_ATOL,
                         min_steps=6)
    cache, cfg = sta.cache, mla.config
    L = cache.layers[0].max_cache_len
    assert type(cache.layers[0]).__name__ == "MLAStaticLatentLayer" and L == 10 + 8 - 1   # generate sizes it: the last token is never cached
    # exactly max_cache_len x (kv_lora_rank + RoPE values [+ key scales]) per layer and row, fp32
    assert latent_cache_bytes(cache) == cfg.num_hidden_layers * 2 * L * cfg.kv_values_per_token * 4


def test_static_cache_left_padding_and_crop():
    mla = upcycle()
    a, b = torch.randint(1, 128, (1, 11)), torch.randint(1, 128, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = generate(mla, batch, attention_mask=mask, cache_implementation="static")
    for row, alone in ((0, a), (1, b)):
        ref = generate(mla, alone)
        assert_greedy_agrees([s[row:row + 1] for s in out.logits], out.sequences[row:row + 1, 11:], ref.logits,
                             ref.sequences[:, alone.shape[1]:], TINY_FP32_ATOL, min_steps=4)
    x = torch.randint(0, 128, (1, 16))
    cache = StaticCache(config=mla.config, max_cache_len=24)
    with torch.no_grad():
        mla(x, cache=cache, use_cache=True)
        cache.crop(-6)                                                      # drop the last 6 of 16
        assert int(cache.get_seq_length()) == 10
        step = mla(x[:, 10:11], cache=cache, use_cache=True).logits[:, -1]
        ref = mla(x[:, :11]).logits[:, -1]
    assert torch.allclose(step, ref, atol=TINY_FP32_ATOL, rtol=0)


def test_static_cache_beam_search_equals_dynamic():
    mla, x = upcycle(), torch.randint(1, 128, (2, 7))
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False, return_dict_in_generate=True,
              output_scores=True, pad_token_id=0)
    a, b = mla.generate(x, **kw), mla.generate(x, cache_implementation="static", **kw)
    # as in test_mla.py's beam test: per-step log-probs agree to TINY_FP32_ATOL, and no two kept beams are closer
    assert torch.allclose(a.sequences_scores, b.sequences_scores, atol=6 * TINY_FP32_ATOL, rtol=0)
    assert float(a.sequences_scores.view(2, 3).diff(dim=1).abs().min()) > 12 * TINY_FP32_ATOL
    assert torch.equal(a.sequences, b.sequences)


@torch.no_grad()
def test_absorbed_decode_compiles_in_one_graph_and_equals_eager():
    mla, x, new = upcycle(), torch.randint(0, 128, (2, 10)), torch.randint(0, 128, (2, 4))
    torch._dynamo.reset()
    step = torch.compile(mla.forward, fullgraph=True)   # fullgraph: a graph break raises instead of falling back
    caches = [StaticCache(config=mla.config, max_cache_len=16) for _ in range(2)]
    runs = []
    for cache, fn in zip(caches, (mla.forward, step)):
        mla(x, cache=cache, use_cache=True)             # prefill stays eager, as in generate
        runs.append([fn(input_ids=new[:, t:t + 1], cache=cache, use_cache=True,   # one compile, then the same
                        position_ids=torch.full((2, 1), 10 + t)).logits[:, -1]    # graph at new positions
                     for t in range(new.shape[1])])
    # inductor fuses and reorders the fp32 sums: a few ulps per op, inside TINY_FP32_ATOL (tests/numerics.py)
    for eager, compiled in zip(*runs):
        assert torch.allclose(compiled, eager, atol=TINY_FP32_ATOL, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_filled_cache_has_the_context_and_room_the_speed_benchmark_asks_for(static):
    from hf_ext.mla.measure import filled_cache

    mla = upcycle()
    cache, nxt = filled_cache(mla, 40, batch=3, static=static, room=5)
    cfg, layer = mla.config, cache.layers[-1]
    assert int(cache.get_seq_length()) == 40 and nxt.shape == (3, 1)
    slots = 45 if static else 40
    assert layer.keys.shape == (3, 1, slots, cfg.kv_lora_rank) and layer.values.shape[:3] == (3, 1, slots)
