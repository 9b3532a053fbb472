"""MLA distillation: it learns, it resumes exactly, and it runs under `accelerate launch` with 2 processes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tiny_causal_lm
from hf_ext.mla import UpcycleConfig, upcycle_to_mla
from hf_ext.errors import HfExtError
from hf_ext.mla.anneal import LAM0, LatentNormAnneal
from hf_ext.mla.distill import DistillConfig, distill

ROOT = Path(__file__).resolve().parents[2]


def student_teacher(target="hf_ext"):
    src = tiny_causal_lm()
    with torch.no_grad():
        src.lm_head.weight.mul_(20)  # a peaked teacher: random tiny models are near-uniform, KL ~ 1e-4
    ids = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(1))
    norms = dict(latent_norm_init="gain") if target == "deepseek_v3" else {}      # the form with an active norm
    mla, _ = upcycle_to_mla(src, UpcycleConfig(kv_lora_rank=8, qk_rope_head_dim=4, target=target, **norms),
                            calib_ids=ids, progress=False)
    return mla, src, ids


def kl(student, teacher, ids):
    x = ids[:256].view(4, 64)
    with torch.no_grad():
        s, t = student(x).logits.log_softmax(-1), teacher(x).logits.log_softmax(-1)
    return torch.nn.functional.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean").item()


def test_distill_reduces_kl_and_trains_only_attention():
    mla, src, ids = student_teacher()
    before = {k: v.clone() for k, v in mla.state_dict().items()}
    kl0 = kl(mla, src, ids)
    log = distill(mla, src, ids, DistillConfig(tokens=40 * 4 * 32, seq_len=32, batch_size=4, lr=3e-3), progress=False)
    assert log["steps"] == 40 and kl(mla, src, ids) < 0.7 * kl0  # a rank-8 student cannot reach zero
    changed = {k for k, v in mla.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".self_attn." in k for k in changed)


@pytest.mark.numerics
@pytest.mark.parametrize("target,anneal", [("hf_ext", 0.0), ("deepseek_v3", 0.5)])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, target, anneal):
    cfg = dict(tokens=12 * 2 * 32, seq_len=32, batch_size=2, lr=1e-3, checkpoint_every=4, norm_anneal=anneal)
    full, src, ids = student_teacher(target)
    distill(full, src, ids, DistillConfig(**cfg), progress=False)

    part, src, ids = student_teacher(target)
    ckpt = tmp_path / "ckpt"

    def interrupt(step, tokens):  # crash after step 6, i.e. after the checkpoint at step 4 plus two steps
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(part, src, ids, DistillConfig(**cfg, checkpoint_dir=str(ckpt)), progress=False, on_step=interrupt)
    assert (ckpt / "step.txt").read_text() == "4"
    resumed, src, ids = student_teacher(target)  # a fresh process would start from the upcycled weights too
    log = distill(resumed, src, ids, DistillConfig(**cfg, checkpoint_dir=str(ckpt)), progress=False)
    assert log["steps"] == 12
    assert all(m.variance_epsilon == resumed.config.latent_norm_eps for n, m in resumed.named_modules()
               if n.endswith("kv_a_layernorm"))   # the anneal (steps 0-5 here) ended at DeepSeek's own norm
    # bit for bit: the resumed run restores weights, optimizer and RNG state into fresh tensors, reads the same
    # batches, and so runs the same kernels on the same values as the uninterrupted one
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())


def latent_scale(attn, x):
    """Per token, |kv_a_layernorm(c)| / |c| and rms(kv_a_layernorm(c)), for the attention input x."""
    c = attn.kv_a_proj(x)[..., : attn.r]
    n = attn.kv_a_layernorm(c)
    return n.norm(dim=-1) / c.norm(dim=-1), n.pow(2).mean(-1).sqrt()


@torch.no_grad()
def test_latent_norm_anneal_goes_from_the_identity_to_deepseeks_norm():
    mla, src, ids = student_teacher("deepseek_v3")
    x = ids[:256].view(4, 64)
    layer = mla.model.layers[0]
    attn, y = layer.self_attn, layer.input_layernorm(mla.model.embed_tokens(x))    # what the first norm sees
    anneal = LatentNormAnneal(mla, steps=3)
    p_ref = anneal.start(mla, x)
    ms = attn.kv_a_proj(y)[..., : attn.r].pow(2).mean(-1)
    scale, _ = latent_scale(attn, y)
    # at the start e0 = P (1 - 1e-4) / 1e-4, so g c / sqrt(ms_t + e0) has a per-token scale constant to
    # |ms_t - ms_s| / (2 e0) relative: the norm is linear, as without it
    e0 = attn.kv_a_layernorm.variance_epsilon
    assert e0 == pytest.approx(p_ref[0] * (1 - LAM0) / LAM0)
    assert float(scale.max() / scale.min() - 1) <= float(ms.max() - ms.min()) / (2 * e0) + 1e-6
    for t in range(3):
        mla(x)                                      # the hooks read each latent's mean square
        anneal.step(t)
    anneal.close()
    assert attn.kv_a_layernorm.variance_epsilon == mla.config.latent_norm_eps
    _, rms = latent_scale(attn, y)
    # the active norm: every token's latent leaves with rms = g to eps / (2 ms) relative (the gain is one value on
    # all r channels, from the gain init, and the rescales multiply the channels alike), plus float32 rounding
    g = attn.kv_a_layernorm.weight
    assert torch.equal(g, g[:1].expand_as(g))
    tol = mla.config.latent_norm_eps / (2 * float(ms.min())) + 1e-6
    assert torch.allclose(rms, g[:1].expand_as(rms), rtol=tol, atol=0)
    with pytest.raises(HfExtError, match="target='deepseek_v3'"):
        LatentNormAnneal(student_teacher()[0], steps=3)


def test_distill_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from accelerate import Accelerator
        from conftest import tiny_causal_lm
        from hf_ext.mla import UpcycleConfig, upcycle_to_mla
        from hf_ext.mla.distill import DistillConfig, distill
        acc = Accelerator(cpu=True)
        src = tiny_causal_lm()
        ids = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(1))
        mla, _ = upcycle_to_mla(src, UpcycleConfig(kv_lora_rank=8, qk_rope_head_dim=4), calib_ids=ids, progress=False)
        log = distill(mla, src, ids, DistillConfig(tokens=8 * 2 * 32 * 2, seq_len=32, batch_size=2), progress=False,
                      accelerator=acc)
        w = mla.model.layers[0].self_attn.kv_a_proj.weight
        print(json.dumps({{"rank": acc.process_index, "n": acc.num_processes, "steps": log["steps"],
                           "w": w.sum().item()}}), flush=True)
        acc.wait_for_everyone()
        acc.end_training()  # destroy the gloo group on both ranks: a rank that exits first can abort the other
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `accelerate launch --cpu` runs one process unless given an MPI hostfile; torchrun starts two gloo
    # processes, which Accelerator(cpu=True) picks up as MULTI_CPU (DDP). --standalone: a free port, not 29500.
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", r.stdout)]  # the two ranks' prints may interleave
    assert sorted(x["rank"] for x in rows) == [0, 1] and all(x["n"] == 2 and x["steps"] == 8 for x in rows)
    assert rows[0]["w"] == pytest.approx(rows[1]["w"], abs=1e-6)  # DDP kept both replicas identical


def _token_store(path, ids, seq_len=32):
    from hf_ext.data import Field, StoreWriter

    n = ids.numel() // seq_len
    with StoreWriter(path, [Field("input_ids", "uint16", (seq_len,))], {"vocab_size": 128}, shard_records=40) as w:
        w.write_batch({"input_ids": ids[: n * seq_len].view(n, seq_len)})
    return path


@pytest.mark.numerics
def test_distill_from_a_token_store_learns_and_resumes_exactly(tmp_path):
    mla, src, ids = student_teacher()
    store = _token_store(tmp_path / "tok", ids)
    kl0 = kl(mla, src, ids)
    log = distill(mla, src, str(store), DistillConfig(tokens=40 * 4 * 32, seq_len=32, batch_size=4, lr=3e-3),
                  progress=False)
    assert log["steps"] == 40 and kl(mla, src, ids) < 0.7 * kl0  # as from a tensor of ids (the first test)

    cfg = dict(tokens=12 * 2 * 32, seq_len=32, batch_size=2, lr=1e-3, checkpoint_every=4)
    full, src, ids = student_teacher()
    distill(full, src, store, DistillConfig(**cfg), progress=False)

    def interrupt(step, tokens):
        if step == 6:
            raise KeyboardInterrupt

    part, src, ids = student_teacher()
    with pytest.raises(KeyboardInterrupt):
        distill(part, src, store, DistillConfig(**cfg, checkpoint_dir=str(tmp_path / "ck")), progress=False,
                on_step=interrupt)
    resumed, src, ids = student_teacher()
    distill(resumed, src, store, DistillConfig(**cfg, checkpoint_dir=str(tmp_path / "ck")), progress=False)
    # bit for bit: the resumed run restores weights, optimizer and RNG state into fresh tensors, reads the same
    # batches, and so runs the same kernels on the same values as the uninterrupted one
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())


def test_distill_refuses_a_store_of_other_windows(tmp_path):
    from hf_ext.data import DataFormatError

    mla, src, ids = student_teacher()
    store = _token_store(tmp_path / "tok", ids, seq_len=64)
    with pytest.raises(DataFormatError, match="windows of 32 tokens. Write it with `hf-ext data tokens --window 32`"):
        distill(mla, src, store, DistillConfig(tokens=256, seq_len=32, batch_size=2), progress=False)
