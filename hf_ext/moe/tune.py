"""Read-ME's alternating training: the router, then the experts with the router fixed, round after round.

Paper: https://arxiv.org/abs/2410.19123 (Sec. 3.3). Slicing a dense MLP into experts loses quality: every
token drops the neurons outside its expert. The rounds win it back:

1. **Router round.** Each token's target is the expert that reproduces the dense MLPs best *now*
   (``router.error_scores``: shared + routed expert d on the dense model's own MLP inputs, squared error
   against the dense MLP, relative per layer, summed over layers), and the router trains toward it
   (``router.train_router``). Round 0 routes by the sliced experts; later rounds by the tuned ones.
2. **Expert round.** With the router's choices fixed, every ``PreGatedMoEMLP`` weight trains to match the
   dense model's next-token distribution, KL(dense || MoE); attention, norms, embeddings and router stay
   frozen.

The expert rounds share one AdamW and one schedule: linear warmup over ``warmup_tokens`` (a fixed count, so
a short run tells you about a long one), then cosine to zero at ``tokens``. Windows come from an hf-ext
token store (``hf_ext.data``). The run goes through accelerate and saves its state after every phase and
every ``checkpoint_every`` steps; rerun with the same ``checkpoint_dir`` and it resumes where it stopped.

Example:
    >>> from hf_ext.data import write_token_windows
    >>> from hf_ext.moe.tune import TuneConfig, tune
    >>> write_token_windows(["train.txt"], "smollm2-135m", 256, "tokens/")     # doctest: +SKIP
    >>> log = tune(moe, dense, "tokens/", TuneConfig(tokens=65_536))         # doctest: +SKIP
    >>> log["rounds"][-1]["router_target_accuracy"]                           # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .extract import MoEError
from .router import error_scores, target_accuracy, train_router


@dataclass
class TuneConfig:
    """Args:
    tokens: expert-training tokens, all rounds together (steps = tokens // (seq_len * batch_size)).
    rounds: router + expert rounds; the expert steps are split evenly between them.
    seq_len / batch_size: the store's window length, and windows per step (per process).
    lr / warmup_tokens: AdamW peak learning rate of the experts, and its linear warmup in tokens.
    router_windows: the store's first windows, on which each router round computes targets and trains.
    router_epochs / router_lr: passes over them per round, and the router's AdamW learning rate.
    checkpoint_dir / checkpoint_every: accelerate state, saved after every phase and every N expert steps.
    """

    tokens: int = 65_536
    rounds: int = 2
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 3e-4       # train-split validation after 24k tokens: 1e-4 40.3, 3e-4 33.6 (benchmarks/moe_tune.py --lr)
    warmup_tokens: int = 16_384
    router_windows: int = 64
    router_epochs: int = 4
    router_lr: float = 1e-3
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    seed: int = 0


def _schedule(opt, warmup: int, steps: int):
    """Linear warmup over ``warmup`` steps, then cosine to zero at ``steps`` (torch's LambdaLR)."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _router_batches(store, n: int, seq_len: int, batch_size: int) -> list[dict]:
    from ..data import ShardedDataset

    ds = store if isinstance(store, ShardedDataset) else ShardedDataset(store)
    n = min(n, len(ds))
    ids = ds.__getitems__(list(range(n)))["input_ids"].long()                       # (n, seq_len)
    if ids.shape[1] != seq_len:
        raise MoEError(f"store windows hold {ids.shape[1]} tokens; TuneConfig.seq_len is {seq_len}")
    return [{"input_ids": ids[i:i + batch_size]} for i in range(0, n, batch_size)]


def tune(moe, dense, store, config: TuneConfig | None = None, route=None, on_step=None, progress: bool = True,
         accelerator=None) -> dict:
    """Train ``moe`` (a ``PreGatedMoEForCausalLM`` converted from ``dense``) in place by alternating rounds.

    ``store``: an hf-ext token store (folder or ``ShardedDataset``) of ``seq_len`` windows. ``route``: a fixed
    routing ``(B, T) ids -> (B, T) experts`` used instead of the router (a baseline; no router rounds). A model
    with one expert (static pruning) has no router rounds either. ``on_step(step, tokens)`` runs after every
    expert step (e.g. a validation curve); its time is excluded from ``seconds``.

    Returns a log: steps, tokens, seconds, tokens/s, and per round the router's target accuracy on its
    windows (before and after its training) and the first and last KL of the expert round.

    (About 115 lines: the alternation of router and expert rounds, with checkpoint and resume between any two
    steps, is kept in one loop so that the resume points are visible; the router round is ``train_router``
    and the losses are ``router_loss`` and one KL expression.)
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..data.loader import token_batches

    cfg = config or TuneConfig()
    if cfg.rounds < 1 or cfg.tokens < 0:
        raise MoEError(f"rounds={cfg.rounds}, tokens={cfg.tokens}: give at least one round and tokens >= 0")
    acc = accelerator or Accelerator()
    set_seed(cfg.seed)
    per_step = cfg.seq_len * cfg.batch_size * acc.num_processes
    steps = cfg.tokens // per_step
    bounds = [round(steps * r / cfg.rounds) for r in range(cfg.rounds + 1)]        # expert steps of each round
    has_router = route is None and moe.config.num_experts > 1
    mlp_params = [p for layer in moe.model.layers for p in layer.mlp.parameters()]
    for p in moe.parameters():
        p.requires_grad_(False)
    for p in mlp_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(mlp_params, lr=cfg.lr, weight_decay=0.0)
    sched = _schedule(opt, math.ceil(cfg.warmup_tokens / per_step), steps)
    model, opt, sched = acc.prepare(moe, opt, sched)
    dense = dense.to(acc.device).eval()
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    state = {"step": 0, "routed_rounds": 0, "rounds": [], "config": asdict(cfg)}
    if ckpt is not None and (ckpt / "tune_state.json").exists():
        saved = json.loads((ckpt / "tune_state.json").read_text())
        if {k: v for k, v in saved["config"].items() if k != "checkpoint_dir"} != \
                {k: v for k, v in state["config"].items() if k != "checkpoint_dir"}:
            raise MoEError(f"{ckpt} holds a run with another TuneConfig ({saved['config']}); resume with the same "
                           "settings or give a new checkpoint_dir")
        acc.load_state(str(ckpt))
        state = saved

    def save():
        if ckpt is None:
            return
        acc.save_state(str(ckpt))
        if acc.is_main_process:
            tmp = ckpt / "tune_state.json.tmp"
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(ckpt / "tune_state.json")                                # atomic: state matches weights

    bar = tqdm(total=steps, initial=state["step"], desc="moe: experts", unit="step",
               disable=not (progress and acc.is_main_process))
    it = token_batches(store, cfg.batch_size, cfg.seq_len, steps, state["step"], cfg.seed, acc.device,
                       moe.config.vocab_size) if steps > state["step"] else iter(())
    t0, paused, first = time.perf_counter(), 0.0, state["step"]
    for r in range(cfg.rounds):
        if has_router and state["routed_rounds"] <= r:
            inner = acc.unwrap_model(model)
            batches = _router_batches(store, cfg.router_windows, cfg.seq_len, cfg.batch_size)
            scores = error_scores(inner, dense, batches)
            before = target_accuracy(inner, batches, scores)
            for p in inner.router.parameters():
                p.requires_grad_(True)
            train_router(inner, batches, scores, epochs=cfg.router_epochs, lr=cfg.router_lr, seed=cfg.seed + r,
                         progress=progress and acc.is_main_process)
            for p in inner.router.parameters():
                p.requires_grad_(False)
            state["rounds"].append({"round": r, "router_target_accuracy_before": before,
                                    "router_target_accuracy": target_accuracy(inner, batches, scores)})
            state["routed_rounds"] = r + 1
            save()
        model.train()
        kls = []
        for step in range(max(state["step"], bounds[r]), bounds[r + 1]):
            x = next(it)                                                              # (B, T) token ids
            with torch.no_grad():
                target = F.log_softmax(dense(input_ids=x, use_cache=False).logits.float(), -1)      # (B, T, V)
            logits = model(input_ids=x, use_cache=False, expert_ids=None if route is None else route(x)).logits
            loss = F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, 1), target.flatten(0, 1),
                            log_target=True, reduction="batchmean")
            acc.backward(loss)
            acc.clip_grad_norm_(mlp_params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            kls.append(loss.item())
            state["step"] = step + 1
            bar.update()
            bar.set_postfix(round=r, kl=f"{kls[-1]:.4f}")
            if on_step is not None:
                t_cb = time.perf_counter()
                on_step(step + 1, (step + 1) * per_step)
                model.train()
                paused += time.perf_counter() - t_cb
            if ckpt is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < bounds[r + 1]:
                save()
        model.eval()
        if kls:
            row = next((x for x in state["rounds"] if x["round"] == r), None)
            if row is None:
                row = {"round": r}
                state["rounds"].append(row)
            row.setdefault("kl_first", kls[0])
            row["kl_last"] = sum(kls[-10:]) / len(kls[-10:])
        save()
    bar.close()
    secs = time.perf_counter() - t0 - paused
    for p in moe.parameters():
        p.requires_grad_(False)
    return {"steps": steps, "tokens": steps * per_step, "seconds": secs,
            "tokens_per_s": (steps - first) * per_step / max(secs, 1e-9), "rounds": state["rounds"]}
