"""Distil an upcycled MLA student against its source (the teacher), through accelerate.

Loss per token: KL(teacher || student) on the next-token distributions, plus optionally
``hidden_mse`` times the MSE of the final hidden states. The same function runs on one CPU, one GPU or
multi-GPU DDP (``accelerate launch``); checkpoints are accelerate states, so a run resumes exactly.

Example:
    >>> from hf_ext.mla.distill import distill, DistillConfig
    >>> log = distill(mla, source, train_ids, DistillConfig(tokens=200_000))   # doctest: +SKIP
    >>> log = distill(mla, source, "tokens/", DistillConfig(tokens=200_000))   # an hf-ext token store  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import HfExtError
from .anneal import NORM_ANNEAL, LatentNormAnneal


@dataclass
class DistillConfig:
    """Args:
    tokens: training tokens in total (steps = tokens // (seq_len * batch_size)).
    seq_len / batch_size: window length and windows per step (per process).
    lr / warmup_steps: AdamW peak learning rate, reached linearly over ``warmup_steps`` optimiser steps and then
        cosine-decayed to 0 at the end. The warmup is a number of steps, not a fraction of the run: it lets
        Adam's moment estimates settle (its first update moves every weight by about ``lr`` whatever its
        gradient), which takes steps, and a short run then starts exactly as a long one does.
    max_grad_norm: the gradients' global norm is clipped to this.
    spike_guard: a step whose loss is not finite or above ``spike_guard`` times the median of the last 16 restores
        the last good weights and optimiser state and halves the learning rate (``hf_ext.mla.guard``; it says
        so, and the log lists the restores). None turns it off. Its snapshots (the trainable weights and Adam's
        two moments, on the CPU, every 10 steps) cost three copies of the trainable weights in host memory.
    trainable: "attention" (only the MLA attention weights), "all", or a comma list of name substrings.
    hidden_mse: weight of the final-hidden-state MSE term (0 = logits KL only).
    checkpoint_dir / checkpoint_every: where and how often (steps) to save accelerate state; resume from it.
    norm_anneal: for a DeepSeek-form student (``latent_norm=True``), the fraction of steps over which each KV
        latent RMSNorm goes from the identity to itself (``hf_ext.mla.anneal``); 0 trains the norm as it is.
        None (default): ``NORM_ANNEAL`` for a student with latent norms, else 0.
    """

    tokens: int = 100_000
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 5e-4       # 1e-3 is at the edge: on one 32k run it plateaued (eval ppl 23.7 vs 18.6), on another it won (benchmarks/results/mla_distill_stability_selection.json, _lr1e-3.json)
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    spike_guard: float | None = 3.0
    trainable: str = "attention"
    hidden_mse: float = 0.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    seed: int = 0
    norm_anneal: float | None = None


def trainable_names(model, spec: str) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if spec == "all":
        return names
    keys = ["self_attn."] if spec == "attention" else [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [n for n in names if any(k in n for k in keys)]
    if not chosen:
        raise HfExtError(f"trainable={spec!r} matches no parameter; use 'attention', 'all' or name substrings")
    return chosen


def _windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    if n == 0:
        raise HfExtError(f"training text gives {ids.numel()} tokens, fewer than one window of {seq_len}; give more text")
    return ids.flatten()[: n * seq_len].view(n, seq_len)


def distill(student, teacher, train_ids, config: DistillConfig | None = None,
            progress: bool = True, accelerator=None, on_step=None) -> dict:
    """Train ``student`` in place. Returns a log: steps, tokens, seconds, tokens/s, first/last loss, the
    per-step ``losses`` and ``grad_norms`` (before clipping; NaN where the spike guard skipped the step), the guard's
    ``restores``, and the latent norm anneal fraction used. The student comes back in eval mode with its plain
    forward (an accelerator's autocast wrapper is removed), on the accelerator's device.

    ``train_ids``: a 1-D tensor of token ids (cut into ``seq_len`` windows), or an hf-ext token store
    (folder or ``ShardedDataset`` of ``seq_len`` windows, see ``hf_ext.data``) read by its fast loader.

    ``on_step(step, tokens)`` is called after every optimiser step (e.g. to evaluate a learning curve);
    the time it takes is excluded from ``seconds``.

    (About 100 lines: the loop is kept whole, so that one step's order, from data and the norm anneal through
    teacher, student, loss, clip, step and schedule to the checkpoint, reads top to bottom; its math lives in
    ``anneal.py`` and the loss is one expression.)
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    cfg = config or DistillConfig()
    acc = accelerator or Accelerator()
    set_seed(cfg.seed)
    steps = max(1, cfg.tokens // (cfg.seq_len * cfg.batch_size * acc.num_processes))
    names = set(trainable_names(student, cfg.trainable))
    for n, p in student.named_parameters():
        p.requires_grad_(n in names)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, steps), steps)
    from_store = not isinstance(train_ids, torch.Tensor)
    if not from_store:
        data = _windows(train_ids, cfg.seq_len)
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.cat([torch.randperm(len(data), generator=g)
                           for _ in range(math.ceil(steps * cfg.batch_size / len(data)) + 1)])
        loader = torch.utils.data.DataLoader(data[order[: steps * cfg.batch_size * acc.num_processes]],
                                             batch_size=cfg.batch_size)
    student.train()
    student, opt, sched = acc.prepare(student, opt, sched)
    if not from_store:
        loader = acc.prepare(loader)
    teacher = teacher.to(acc.device).eval()
    start = 0
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt is not None and (ckpt / "step.txt").exists():
        acc.load_state(str(ckpt))
        start = int((ckpt / "step.txt").read_text())
    losses, grad_norms, t0, paused = [], [], time.perf_counter(), 0.0
    guard = None
    if cfg.spike_guard is not None:
        from .guard import LossSpikeGuard

        guard = LossSpikeGuard(params, opt, getattr(sched, "scheduler", sched), factor=cfg.spike_guard)
        if start and (ckpt / "guard.json").exists():
            guard.load_state_dict(json.loads((ckpt / "guard.json").read_text()))
    if from_store:
        from ..data.loader import token_batches

        it = token_batches(train_ids, cfg.batch_size, cfg.seq_len, steps, start, cfg.seed, acc.device,
                           acc.unwrap_model(student).config.vocab_size)
    else:
        it = iter(acc.skip_first_batches(loader, start) if start else loader)
    anneal, frac = None, cfg.norm_anneal
    if frac is None:
        frac = NORM_ANNEAL if getattr(acc.unwrap_model(student).config, "latent_norm", False) else 0.0
    if frac > 0:
        anneal = LatentNormAnneal(acc.unwrap_model(student), round(frac * steps))
        saved = ckpt / "anneal.json" if ckpt is not None else None
        p_ref = json.loads(saved.read_text()) if start and saved is not None and saved.exists() else None
    bar = tqdm(range(start, steps), desc="mla: distill", unit="step", disable=not (progress and acc.is_main_process))
    for step in bar:
        x = next(it)
        if anneal is not None and anneal.p_ref is None:
            p_ref = anneal.start(student, x, start, p_ref)
            if ckpt is not None and acc.is_main_process:
                ckpt.mkdir(parents=True, exist_ok=True)
                (ckpt / "anneal.json").write_text(json.dumps(p_ref))
        with torch.no_grad():
            t_out = teacher(input_ids=x, output_hidden_states=cfg.hidden_mse > 0, use_cache=False)
        s_out = student(input_ids=x, use_cache=False, output_hidden_states=cfg.hidden_mse > 0)
        loss = F.kl_div(F.log_softmax(s_out.logits.float(), -1).flatten(0, 1),
                        F.log_softmax(t_out.logits.float(), -1).flatten(0, 1), log_target=True, reduction="batchmean")
        if cfg.hidden_mse > 0:
            loss = loss + cfg.hidden_mse * F.mse_loss(s_out.hidden_states[-1], t_out.hidden_states[-1])
        losses.append(acc.reduce(loss.detach(), "mean").item())   # every process sees the same value
        if guard is not None and guard.check(step, losses[-1]):   # a spike: the state went back, skip the batch
            if acc.is_main_process:
                bar.write(guard.message())
            grad_norms.append(float("nan"))
        else:
            acc.backward(loss)
            grad_norms.append(acc.clip_grad_norm_(params, cfg.max_grad_norm).item())
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        del s_out, t_out, loss
        if anneal is not None:
            anneal.step(step)
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        if on_step is not None:
            t_cb = time.perf_counter()
            on_step(step + 1, (step + 1) * cfg.seq_len * cfg.batch_size * acc.num_processes)
            student.train()
            paused += time.perf_counter() - t_cb
        if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps):
            acc.save_state(str(ckpt))
            if acc.is_main_process:
                if guard is not None:
                    (ckpt / "guard.json").write_text(json.dumps(guard.state_dict()))
                (ckpt / "step.txt").write_text(str(step + 1))
    if anneal is not None:
        anneal.close()
    secs = time.perf_counter() - t0 - paused
    done = steps - start
    acc.unwrap_model(student, keep_fp32_wrapper=False).eval()   # the plain forward again: no autocast wrapper
    return {"steps": steps, "tokens": steps * cfg.seq_len * cfg.batch_size * acc.num_processes,
            "seconds": secs, "tokens_per_s": done * cfg.seq_len * cfg.batch_size / max(secs, 1e-9),
            "loss_first": losses[0] if losses else None, "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "norm_anneal": frac, "losses": losses, "grad_norms": grad_norms,
            "restores": guard.events if guard is not None else []}
