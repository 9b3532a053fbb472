"""MLA distillation's stability parts: the loss-spike guard, a warmup that does not depend on the run's length,
and a student handed back without the accelerator's autocast wrapper."""
from __future__ import annotations

import pytest
import torch

from hf_ext.errors import HfExtError
from hf_ext.mla.distill import DistillConfig, distill
from hf_ext.mla.guard import LossSpikeGuard
from test_mla_distill import kl, student_teacher

RUN = dict(tokens=40 * 4 * 32, seq_len=32, batch_size=4)


def test_the_guard_restores_weights_and_adam_state_exactly_and_halves_the_lr():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    guard = LossSpikeGuard(lin.parameters(), opt, sched, factor=3.0, snapshot_every=100)

    def step():
        lin(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()                                               # Adam has moments before the snapshot
    assert guard.check(0, 1.0) is False                  # the first good step takes the snapshot
    saved_w = [p.detach().clone() for p in lin.parameters()]
    saved_m = [opt.state[p]["exp_avg"].clone() for p in lin.parameters()]
    for s in range(1, 4):
        step()
        assert guard.check(s, 1.1) is False              # 1.1 < 3 x median(1.0, ...): not a spike
    assert guard.check(4, 3.5) is True                   # 3.5 > 3 x 1.05
    assert all(torch.equal(p, w) for p, w in zip(lin.parameters(), saved_w))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(lin.parameters(), saved_m))
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3) and sched.base_lrs == [pytest.approx(5e-3)]
    assert guard.events[0] | {"median": None} == {"step": 4, "loss": 3.5, "median": None, "restored_step": 0,
                                                   "lr_scale": 0.5}
    assert guard.check(5, float("nan")) is True          # a non-finite loss is a spike too


def test_the_guard_rescues_a_run_that_diverges_without_it():
    # lr 3e-2 is ten times this tiny student's working lr: unguarded, the loss jumps 4x at step 2 and the
    # student ends far worse than it started. Guarded, the jump restores step 0 and halves the lr (twice).
    hot = dict(RUN, lr=3e-2, warmup_steps=2)
    mla, src, ids = student_teacher()
    kl0 = kl(mla, src, ids)
    log = distill(mla, src, ids, DistillConfig(**hot, spike_guard=None), progress=False)
    assert kl(mla, src, ids) > 2 * kl0 and log["restores"] == []
    mla, src, ids = student_teacher()
    log = distill(mla, src, ids, DistillConfig(**hot), progress=False)
    assert kl(mla, src, ids) < kl0
    assert log["restores"] and all(r["restored_step"] < r["step"] for r in log["restores"])
    skipped = [s for s, g in enumerate(log["grad_norms"]) if g != g]   # NaN marks a skipped step
    assert skipped == [r["step"] for r in log["restores"]]


def test_the_guard_gives_up_with_an_error_that_names_the_fix():
    mla, src, ids = student_teacher()
    with pytest.raises(HfExtError, match="lower lr or more warmup_steps"):
        distill(mla, src, ids, DistillConfig(**RUN, lr=1.0, warmup_steps=2), progress=False)


def test_the_warmup_does_not_depend_on_the_runs_length():
    # The lr at step s <= warmup_steps is lr * s / warmup_steps whatever the run's length, so a short run and
    # a long one take the same first warmup_steps + 1 steps, bit for bit (the data order is the seed's).
    logs = []
    for tokens in (20 * 4 * 32, 60 * 4 * 32):
        mla, src, ids = student_teacher()
        logs.append(distill(mla, src, ids, DistillConfig(**dict(RUN, tokens=tokens), lr=3e-3, warmup_steps=5),
                            progress=False))
    assert logs[0]["losses"][:6] == logs[1]["losses"][:6]
    assert logs[0]["losses"][6:8] != logs[1]["losses"][6:8]          # after it, the cosine decays differ


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)   # the state is a process-wide singleton
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_distill_hands_back_the_plain_forward_after_bf16_autocast(fresh_accelerate_state):
    from accelerate import Accelerator

    mla, src, ids = student_teacher()
    distill(mla, src, ids, DistillConfig(**dict(RUN, tokens=2 * 4 * 32)), progress=False,
            accelerator=Accelerator(mixed_precision="bf16", cpu=True))
    assert not mla.training
    with torch.no_grad():          # under the wrapper, bf16 autocast would change the logits

        plain = type(mla).forward(mla, input_ids=ids[:64][None]).logits
        assert torch.equal(mla(ids[:64][None]).logits, plain)
