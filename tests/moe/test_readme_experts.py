"""Read-ME expert extraction, the sliced MoE MLP (dense equivalence), and the expert-cache policies."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_causal_lm
from numerics import TINY_FP32_ATOL

from hf_ext.moe import MoEError, activation_stats, expert_masks, hits, optimal_hits_brute_force
from hf_ext.moe.experts import moefy, set_experts
from hf_ext.moe.extract import ActivationStats, kmeans, mlp_kind, router_targets

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
            for _ in range(n)]


def test_masks_by_hand():
    # 1 layer, 2 clusters, 6 neurons; top-p 0.5 keeps 3 per cluster
    mean = torch.tensor([[[9., 8, 7, 0, 0, 1], [9., 0, 0, 8, 7, 1]]])
    m = expert_masks(ActivationStats(mean, torch.ones(2), []), top_p=0.5)
    assert m.shared[0].tolist() == [0] and m.routed[0].tolist() == [[1, 2], [3, 4]]
    assert m.active_fraction == 0.5
    with pytest.raises(MoEError, match=r"top_p=1.5 must lie in \(0, 1\]"):
        expert_masks(ActivationStats(mean, torch.ones(2), []), top_p=1.5)
    with pytest.raises(MoEError, match="3 experts need at least 3 neurons"):
        expert_masks(ActivationStats(torch.ones(1, 3, 2), torch.ones(3), []), top_p=0.5)


def test_kmeans_separates_blobs():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 3, generator=g) + 10, torch.randn(20, 3, generator=g) - 10])
    ids = kmeans(x, 2)
    assert len(set(ids[:20].tolist())) == 1 and len(set(ids[20:].tolist())) == 1 and ids[0] != ids[-1]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@torch.no_grad()
def test_masks_covering_every_neuron_reproduce_the_dense_logits(family):
    model = tiny_causal_lm(family)
    batch = _batches(1)[0]
    dense = model(**batch).logits
    stats = activation_stats(model, _batches(), clusters=4, labels=[torch.tensor([0, 1]), torch.tensor([2, 3]),
                                                                      torch.tensor([1, 2])])
    mlps = moefy(model, expert_masks(stats, top_p=1.0))
    set_experts(mlps, torch.randint(0, 4, (2, 12)))
    # lossless in exact arithmetic: the shared and routed slices sum the same 64 neurons in another order
    torch.testing.assert_close(model(**batch).logits, dense, atol=TINY_FP32_ATOL, rtol=0)


@torch.no_grad()
def test_half_the_neurons_equal_the_dense_mlp_with_the_rest_zeroed():
    model = tiny_causal_lm("llama")
    stats = activation_stats(model, _batches(), clusters=4)                      # k-means clusters
    masks = expert_masks(stats, top_p=0.5)
    assert len(masks.routed) == 2 and masks.routed[0].shape[0] == 4 and masks.active_fraction == 0.5
    assert all(len(s) + r.shape[1] == 32 for s, r in zip(masks.shared, masks.routed))   # 50% of 64 per layer
    x = torch.randn(2, 5, 32)
    ids = torch.randint(0, 4, (2, 5))
    dense = model.model.layers[0].mlp
    h = dense.act_fn(dense.gate_proj(x)) * dense.up_proj(x)                         # (2, 5, 64)
    keep = torch.zeros(2, 5, 64, dtype=torch.bool)
    keep[..., masks.shared[0]] = True
    for d in range(4):
        keep[(ids == d)[..., None] & torch.isin(torch.arange(64), masks.routed[0][d])] = True
    want = dense.down_proj(h * keep)
    moe = moefy(model, masks)[0]
    moe.expert_ids = ids
    # the same products, summed over 32 kept neurons here and 64 (32 of them zero) there: outputs are <= 3e-3,
    # the terms |h w| ~6e-5, so rounding is <= 2 gamma(64) x 64 x 6e-5 ~ 3e-8; one neuron kept or dropped
    # wrongly moves outputs by ~7e-5 on average, up to several 1e-4
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=0)


def test_router_targets_pick_the_best_overlap():
    mean = torch.tensor([[[9., 8, 7, 0, 0, 1], [9., 0, 0, 8, 7, 1]]])
    m = expert_masks(ActivationStats(mean, torch.ones(2), []), top_p=0.5)
    top = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 0]], dtype=torch.bool)   # two tokens' top neurons
    assert router_targets(m, [top]).tolist() == [0, 1]


def test_unsupported_mlp_is_a_clear_error():
    with pytest.raises(MoEError, match="supported: gated"):
        mlp_kind(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_belady_is_optimal_and_lru_never_beats_it():
    r = random.Random(0)
    for _ in range(300):
        trace, cap = [r.randrange(6) for _ in range(r.randrange(1, 14))], r.randrange(1, 5)
        assert hits(trace, cap, "belady") == optimal_hits_brute_force(trace, cap), (trace, cap)
        assert hits(trace, cap, "lru") <= hits(trace, cap, "belady") and hits(trace, cap, "none") == 0
    assert hits([0, 1, 2, 0, 1, 2], 2, "lru") == 0 and hits([0, 1, 2, 0, 1, 2], 2, "belady") == 2
    long = [r.randrange(6) for _ in range(400)]
    full = hits(long, 3, "belady")
    assert hits(long, 3, "belady", lookahead=len(long)) == full                       # seeing everything: Belady
    assert hits(long, 3, "lru") <= hits(long, 3, "belady", lookahead=8) <= full
    with pytest.raises(MoEError, match="capacity=0"):
        hits([0], 0)
