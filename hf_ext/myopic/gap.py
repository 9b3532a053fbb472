"""The myopia gap on a real LM: fine-tune vanilla and myopic copies identically, compare held-out loss.

gap (nats/token) = NLL(myopic) - NLL(vanilla) on held-out text, after the same data, steps, schedule
and seed. A positive gap is what the model loses when positions may not prepare for later ones.

Example:
    >>> from hf_ext.myopic.gap import GapConfig, myopia_gap
    >>> report = myopia_gap(GapConfig(model="smollm2-135m", steps=50))  # doctest: +SKIP
    >>> report["gap_nats"]  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import BadTextError


@dataclass
class GapConfig:
    """model: zoo name / folder / Hub id; train_text / eval_text: corpus specs (kept apart);
    local_window: None = myopic, w = local myopic (gradients within the last w positions);
    extra_local_windows: also fine-tune a local-myopic copy per window (reported as ``local{w}``)."""

    model: str = "smollm2-135m"
    train_text: str = "python-docs:train"
    eval_text: str = "python-docs:eval"
    steps: int = 100
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 3e-5
    warmup: float = 0.1
    local_window: int | None = None
    extra_local_windows: tuple[int, ...] = ()
    eval_tokens: int = 16384
    window: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise BadTextError(f"steps={self.steps}, seq_len={self.seq_len}, batch_size={self.batch_size}: "
                               "give steps >= 1, seq_len >= 2 and batch_size >= 1")
        if self.train_text == self.eval_text:
            raise BadTextError(f"train_text and eval_text are both '{self.train_text}'; held-out loss needs "
                               "text the fine-tuning never saw (e.g. python-docs:train / python-docs:eval)")


def finetune_lm(model, windows: torch.Tensor, cfg: GapConfig, progress: bool = True, desc: str = "finetune",
                accelerator=None) -> float:
    """Causal-LM fine-tuning on ``windows`` (N, seq_len), same order for every call. Returns seconds."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    from ..training import optimize

    acc = accelerator or Accelerator()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(cfg.warmup * cfg.steps), cfg.steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.seed))

    def step_loss(step: int) -> torch.Tensor:
        idx = order[(step * cfg.batch_size + torch.arange(cfg.batch_size)) % len(windows)]
        ids = windows[idx].to(acc.device)
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    model.train()
    t0 = time.perf_counter()
    optimize(acc, model, opt, sched, step_loss, cfg.steps, desc, progress)
    model.eval()
    return time.perf_counter() - t0


def myopia_gap(cfg: GapConfig | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Fine-tune vanilla and myopic copies of ``cfg.model``; held-out NLL/perplexity and the gap.

    Returns ``(report, models)``, models = {"vanilla": ..., "myopic": ..., "tokenizer": ...}; both models
    are switched back to sdpa attention (the forward is the same; myopia only shaped the training)."""
    from ..eval import perplexity, tokenize
    from ..zoo import load_causal_lm, load_corpus
    from .attention import enable_myopic

    cfg = cfg or GapConfig()
    eval_text = load_corpus(cfg.eval_text)
    base, tok = load_causal_lm(cfg.model)
    need = cfg.steps * cfg.batch_size * cfg.seq_len
    ids = tokenize(tok, load_corpus(cfg.train_text), need)
    n = len(ids) // cfg.seq_len
    if n < 1:
        raise BadTextError(f"train_text '{cfg.train_text}' has {len(ids)} tokens, fewer than one window of "
                           f"{cfg.seq_len}; give more text or a smaller --seq-len")
    windows = ids[: n * cfg.seq_len].view(n, cfg.seq_len)
    ev = dict(max_tokens=cfg.eval_tokens, window=cfg.window, progress=progress)
    models = {"tokenizer": tok}
    report = {**asdict(cfg), "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
              "train_tokens_distinct": n * cfg.seq_len, "nll_base": perplexity(base, tok, eval_text, **ev)["nll"]}
    runs = {"vanilla": False, "myopic": cfg.local_window, **{f"local{w}": w for w in cfg.extra_local_windows}}
    for name, window in runs.items():
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(base)
        if window is not False:
            enable_myopic(model, window)
        report[f"train_seconds_{name}"] = finetune_lm(model, windows, cfg, progress, desc=f"finetune {name}")
        report[f"nll_{name}"] = perplexity(model, tok, eval_text, **ev)["nll"]
        report[f"ppl_{name}"] = math.exp(report[f"nll_{name}"])
        model.set_attn_implementation("sdpa")
        models[name] = model
    report["ppl_base"] = math.exp(report["nll_base"])
    report["gap_nats"] = report["nll_myopic"] - report["nll_vanilla"]
    for w in cfg.extra_local_windows:
        report[f"gap_local{w}_nats"] = report[f"nll_local{w}"] - report["nll_vanilla"]
    return report, models
