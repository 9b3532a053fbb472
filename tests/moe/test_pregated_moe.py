"""PreGatedMoEForCausalLM: conversion exact at full masks, generation, save/load and remote code.

Tolerances (tests/numerics.py): a lossless conversion and its source, or a cache and a recompute, in float32
on the tiny model agree within TINY_FP32_ATOL; the expert-cache tests run in float64, since experts read back
from a safetensors file sit at other memory offsets (other SIMD paths, see numerics.py) and in float64 that
reordering stays within ROUND_TRIP_RTOL64. Expert ids are argmaxes: they are compared bit for bit only when
they come from the same computation, or where the router's top-2 gap is far above the logits' tolerance.
"""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_causal_lm
from helpers import run_without_hf_ext
from numerics import (ROUND_TRIP_RTOL64, TINY_FP32_ATOL, assert_close_rel, assert_greedy_agrees, assert_round_trip,
                      greedy, min_top2_gap)

from hf_ext.moe import MoEError, PreGatedMoEForCausalLM, activation_stats, convert_to_pregated_moe, expert_masks

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 128, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
            for _ in range(n)]


def _moe(family="llama", top_p=0.5, experts=4):
    dense = tiny_causal_lm(family)
    return dense, convert_to_pregated_moe(dense, expert_masks(activation_stats(dense, _batches(), experts), top_p))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@torch.no_grad()
def test_full_masks_reproduce_the_dense_model(family):
    dense, moe = _moe(family, top_p=1.0)
    x = _batches(1)[0]["input_ids"]
    # lossless in exact arithmetic: the shared and routed slices sum the same 64 neurons in another order
    torch.testing.assert_close(moe(x).logits, dense(x).logits, atol=TINY_FP32_ATOL, rtol=0)
    assert moe.config.active_mlp_fraction == 1.0


@torch.no_grad()
def test_routing_is_decided_from_token_ids_and_generation_matches_recompute():
    _, moe = _moe(top_p=0.5)
    assert moe.config.active_mlp_fraction == 0.5
    x = _batches(1)[0]["input_ids"]
    ids = moe.route(x)
    assert ids.shape == x.shape and int(ids.max()) < 4
    moe(x)
    # one expert, every layer; the forward's router call is route()'s computation on the same ids: bit-exact
    assert all(torch.equal(layer.mlp.expert_ids, ids) for layer in moe.model.layers)
    cached_logits, cached = greedy(moe, x, max_new_tokens=5)
    seq, logits = x, []
    for _ in range(5):                                                # recompute the whole prefix every step
        logits.append(moe(seq).logits[:, -1])
        seq = torch.cat([seq, logits[-1].argmax(-1, keepdim=True)], 1)
    # a KV cache and a recompute, equal in exact arithmetic; the router reads the whole prefix on both paths.
    # The smallest top-2 gap is 1e-3 (measured), so all 5 steps are decidable at 2 x TINY_FP32_ATOL
    assert_greedy_agrees(cached_logits, cached, logits, seq[:, x.shape[1]:], atol=TINY_FP32_ATOL, min_steps=5)


def test_save_load_round_trip_and_remote_code(tmp_path):
    _, moe = _moe(top_p=0.5)
    moe.save_pretrained(tmp_path)
    x = _batches(1)[0]["input_ids"]
    logits = lambda m: m(x).logits  # noqa: E731
    with torch.no_grad():
        assert_round_trip(PreGatedMoEForCausalLM.from_pretrained(tmp_path).eval(), moe, logits)
        ref64 = PreGatedMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()   # as the remote side
        want = logits(ref64)
        gen = ref64.generate(x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    got = run_without_hf_ext(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True, dtype=torch.float64).eval()
        x = torch.tensor({x.tolist()})
        with torch.no_grad():
            print(json.dumps({{"logits": m(x).logits.tolist(), "cls": type(m).__name__,
                              "gen": m.generate(x, max_new_tokens=3, do_sample=False).tolist()}}))
    """)
    assert got["cls"] == "PreGatedMoEForCausalLM"
    assert_close_rel(torch.tensor(got["logits"], dtype=torch.float64), want, ROUND_TRIP_RTOL64)   # float64 both sides
    # the same greedy tokens: both sides' logits agree to ROUND_TRIP_RTOL64, far inside every step's top-2 gap
    assert min_top2_gap(gen.logits) > 2 * ROUND_TRIP_RTOL64 * float(want.abs().max())
    assert got["gen"] == gen.sequences.tolist()


def test_bad_input():
    dense, moe = _moe()
    masks = expert_masks(activation_stats(dense, _batches(), 4), 0.5)
    masks.shared.pop()
    with pytest.raises(MoEError, match="masks cover 1 layers, the model has 2"):
        convert_to_pregated_moe(dense, masks)
    with pytest.raises(ValueError, match="needs expert_ids"):
        moe.model.layers[0].mlp(torch.randn(1, 3, 32))


def test_router_training_learns_the_overlap_targets():
    from hf_ext.moe.router import overlap_scores, target_accuracy, train_router

    dense, moe = _moe(top_p=0.5)
    batches = _batches(4)
    masks = expert_masks(activation_stats(dense, _batches(), 4), 0.5)
    scores = overlap_scores(dense, masks, batches)
    assert scores[0].shape == (2, 12, 4)
    before = target_accuracy(moe, batches, scores)
    r = train_router(moe, batches, scores, epochs=30, lr=3e-3, progress=False)
    after = target_accuracy(moe, batches, scores)
    # measured (seeds 0-2): 0.25-0.28 untrained (the majority target's share is 0.33-0.35), 1.0 trained
    assert after > max(0.95, before), (before, after, r["loss_curve"][-1])


@pytest.mark.parametrize("policy", ["lru", "belady"])
@torch.no_grad()
def test_offloaded_experts_give_the_same_logits_and_the_simulated_hits(tmp_path, policy):
    from hf_ext.moe.cache import ExpertCache
    from hf_ext.moe.policy import hits

    _, moe = _moe(top_p=0.5)
    moe = moe.double()                                             # float64: see the module docstring
    x = _batches(1)[0]["input_ids"][:1]                                               # one stream
    ref = moe(x).logits
    experts = [(m.routed_in.clone(), m.routed_out.clone()) for m in (layer.mlp for layer in moe.model.layers)]
    cache = ExpertCache.offload(moe, tmp_path, capacity=2, policy=policy)
    assert moe.model.layers[0].mlp.routed_in.numel() == 0 and (tmp_path / "experts.safetensors").exists()
    # the same experts (the router runs unchanged, so the same routing): float64 summation order only
    assert_close_rel(moe(x).logits, ref, ROUND_TRIP_RTOL64)
    for layer, (w_in, w_out) in enumerate(experts):                 # served bit for bit: data movement
        for d in range(4):
            got = cache.get(layer, d, count=False)
            assert torch.equal(got[0], w_in[d]) and torch.equal(got[1], w_out[d]), (layer, d)
    trace = [int(e) for e in torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(1))]
    cache.hits = cache.misses = 0
    for layer in cache.resident:
        layer.clear()
    for i, e in enumerate(trace):                                                     # token by token
        cache.lookahead(trace[i + 1:i + 9])
        for layer in range(2):
            cache.get(layer, e)
    assert cache.hits == 2 * hits(trace, 2, policy, lookahead=8)
    cache.prefetch([0, 1])
    cache.wait()
    assert all(set(layer) == {0, 1} for layer in cache.resident), [list(layer) for layer in cache.resident]
    with pytest.raises(MoEError, match="capacity=0"):
        ExpertCache(tmp_path / "experts.safetensors", 2, 0)
    with pytest.raises(MoEError, match="store 'ssd'"):
        ExpertCache(tmp_path / "experts.safetensors", 2, 1, store="ssd")


@torch.no_grad()
def test_host_store_serves_experts_from_ram_without_reading_the_file(tmp_path):
    from hf_ext.moe.cache import ExpertCache

    _, moe = _moe(top_p=0.5)
    moe = moe.double()                                             # float64: see the module docstring
    x = _batches(1)[0]["input_ids"][:2]
    ref = moe(x).logits
    experts = [(m.routed_in.clone(), m.routed_out.clone()) for m in (layer.mlp for layer in moe.model.layers)]
    cache = ExpertCache.offload(moe, tmp_path, capacity=1, policy="lru", store="host")
    host = cache.host                                                  # data movement: bit for bit
    assert all(torch.equal(host[f"{layer}.{d}.in"], w_in[d]) and torch.equal(host[f"{layer}.{d}.out"], w_out[d])
               for layer, (w_in, w_out) in enumerate(experts) for d in range(4))

    def no_reads(key):
        raise AssertionError(f"read {key} from disk")
    cache.file = type("NoFile", (), {"get_tensor": staticmethod(no_reads), "keys": lambda self: []})()
    assert_close_rel(moe(x).logits, ref, ROUND_TRIP_RTOL64)        # float64 summation order only
    assert cache.misses > 0
    assert all(len(layer) == 1 for layer in cache.resident)
    assert cache.resident_bytes == sum(cache.host[f"{l}.{d}.{w}"].nbytes for l, layer in enumerate(cache.resident)
                                       for d in layer for w in ("in", "out"))


@torch.no_grad()
def test_left_padded_batches_route_like_each_sequence_alone():
    _, moe = _moe(top_p=0.5)
    moe = moe.double()     # float64: batched and alone are other shapes, so other summation orders
    with torch.no_grad():
        for p in moe.router.parameters():
            p.normal_(0, 0.5)                                     # a router with opinions
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(1, 128, (1, 5), generator=g), torch.randint(1, 128, (1, 9), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])       # left padding
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    batched, alone = moe.router(ids, mask), [moe.router(short)[0], moe.router(long)[0]]
    # equal in exact arithmetic (the pads' attention weights are exactly 0): float64 summation order only
    assert_close_rel(batched[0, 4:], alone[0], ROUND_TRIP_RTOL64)
    assert_close_rel(batched[1], alone[1], ROUND_TRIP_RTOL64)
    # so the argmaxes agree wherever the top-2 gap exceeds that tolerance twice over: everywhere here
    scale = float(torch.cat([alone[0], alone[1]]).abs().max())
    assert min_top2_gap([alone[0], alone[1]]) > 2 * ROUND_TRIP_RTOL64 * scale
    routed = moe.route(ids, mask)
    assert torch.equal(routed[0, 4:], moe.route(short)[0]) and torch.equal(routed[1], moe.route(long)[0])
    assert not torch.equal(moe.route(ids)[0, 4:], moe.route(short)[0])   # without the mask, pads shift it
    out = moe(ids, attention_mask=mask)
    # the same experts (above) and the pads masked out: the logits agree up to float64 summation order
    assert_close_rel(out.logits[0, 4:], moe(short).logits[0], ROUND_TRIP_RTOL64)
