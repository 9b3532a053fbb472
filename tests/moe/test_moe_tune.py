"""Read-ME's alternating rounds (hf_ext.moe.tune): router targets by hand, learning, exact resume, baselines."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_causal_lm

from hf_ext.moe import MoEError, activation_stats, convert_to_pregated_moe, expert_masks
from hf_ext.moe.router import error_scores
from hf_ext.moe.tune import TuneConfig, tune

SEQ = 32


def _store(path, n=48, seed=1):
    from hf_ext.data import Field, StoreWriter

    ids = torch.randint(0, 128, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    with StoreWriter(path, [Field("input_ids", "uint16", (SEQ,))], {"vocab_size": 128}, shard_records=20) as w:
        w.write_batch({"input_ids": ids})
    return path, ids


def _moe(experts=4, top_p=0.5, dtype=torch.float32):
    dense = tiny_causal_lm("llama").to(dtype)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 128, (2, SEQ), generator=g)} for _ in range(3)]
    labels = [torch.zeros(2, dtype=torch.long)] * 3 if experts == 1 else None
    masks = expert_masks(activation_stats(dense, calib, experts, labels=labels), top_p)
    return dense, convert_to_pregated_moe(dense, masks)


@torch.no_grad()
def kl(moe, dense, ids, route=None):
    lp = F.log_softmax(moe(ids, expert_ids=None if route is None else route(ids)).logits, -1)
    return float(F.kl_div(lp.flatten(0, 1), F.log_softmax(dense(ids).logits, -1).flatten(0, 1), log_target=True,
                          reduction="batchmean"))


@torch.no_grad()
def test_error_scores_equal_each_expert_run_on_the_dense_inputs():
    dense, moe = _moe(dtype=torch.float64)
    x = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(3))
    inputs = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for layer in dense.model.layers]
    dense(x)
    for h in hooks:
        h.remove()
    err = 0.0
    for h, dl, ml in zip(inputs, dense.model.layers, moe.model.layers):      # naive: the modules' own forwards
        y, per = dl.mlp(h), []
        for d in range(4):
            ml.mlp.expert_ids = torch.full(x.shape, d)
            per.append((ml.mlp(h) - y).pow(2).sum(-1))
        err = err + torch.stack(per, -1) / y.pow(2).sum(-1).mean()
    want = -err / err.mean(-1, keepdim=True)
    got = error_scores(moe, dense, [{"input_ids": x}])[0]
    # the same float64 sums in another order (the module gathers tokens per expert): n * 2^-53 relative, n < 1e3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got.shape == (2, SEQ, 4) and torch.all(got < 0)


def test_rounds_bring_the_moe_closer_to_the_dense_model(tmp_path):
    store, ids = _store(tmp_path / "tok")
    dense, moe = _moe()
    before = kl(moe, dense, ids)
    log = tune(moe, dense, store, TuneConfig(tokens=24 * 4 * SEQ, rounds=2, seq_len=SEQ, lr=3e-3, warmup_tokens=4 * SEQ,
                                             router_windows=16, router_epochs=20, router_lr=3e-3), progress=False)
    assert log["steps"] == 24 and [r["round"] for r in log["rounds"]] == [0, 1]
    assert kl(moe, dense, ids) < 0.5 * before                     # measured 0.2x on this seed
    r0 = log["rounds"][0]
    assert r0["router_target_accuracy"] > r0["router_target_accuracy_before"]
    assert r0["kl_last"] < r0["kl_first"]
    assert not any(p.requires_grad for p in moe.parameters())


@pytest.mark.parametrize("experts", [1, 4])
def test_static_pruning_and_a_fixed_routing_train_without_router_rounds(tmp_path, experts):
    store, ids = _store(tmp_path / "tok")
    dense, moe = _moe(experts=experts)
    route = None if experts == 1 else (lambda x: x % 4)           # hash routing by token id
    router = {k: v.clone() for k, v in moe.router.state_dict().items()}
    before = kl(moe, dense, ids, route)
    log = tune(moe, dense, store, TuneConfig(tokens=16 * 4 * SEQ, seq_len=SEQ, lr=3e-3, warmup_tokens=4 * SEQ),
               route=route, progress=False)
    assert all("router_target_accuracy" not in r for r in log["rounds"])
    assert all(torch.equal(v, moe.router.state_dict()[k]) for k, v in router.items())
    assert kl(moe, dense, ids, route) < 0.5 * before


def test_an_interrupted_run_resumes_exactly(tmp_path):
    store, _ = _store(tmp_path / "tok")
    cfg = dict(tokens=12 * 2 * SEQ, rounds=2, seq_len=SEQ, batch_size=2, lr=1e-3, warmup_tokens=2 * SEQ,
               router_windows=8, router_epochs=2, checkpoint_every=4)
    dense, full = _moe()
    tune(full, dense, store, TuneConfig(**cfg), progress=False)

    def interrupt(step, tokens):
        if step == 10:                                           # round 1, after its router phase and step 8's save
            raise KeyboardInterrupt

    dense, part = _moe()
    with pytest.raises(KeyboardInterrupt):
        tune(part, dense, store, TuneConfig(**cfg, checkpoint_dir=str(tmp_path / "ck")), on_step=interrupt,
             progress=False)
    dense, resumed = _moe()
    log = tune(resumed, dense, store, TuneConfig(**cfg, checkpoint_dir=str(tmp_path / "ck")), progress=False)
    # bit for bit: weights, optimizer, schedule and RNG are restored, the router round is not rerun, and step
    # k reads the same batch, so the same kernels run on the same values
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())
    assert [r["round"] for r in log["rounds"]] == [0, 1]
    with pytest.raises(MoEError, match="another TuneConfig"):
        tune(resumed, dense, store, TuneConfig(**{**cfg, "lr": 2e-3}, checkpoint_dir=str(tmp_path / "ck")),
             progress=False)
