"""The synthetic pre-caching task of Wu, Morris & Levine (2024), vanilla vs myopic.

Data: x_n ~ N(0, 1), z_n ~ Bernoulli(p), y_n = z_n * sum_{i=1..10} sin(10 x_{n-i}) + (1 - z_n) x_n (lags
before the start count as 0; ``freq`` is the 10). The model sees (x_n, z_n) and predicts y_n at the same
position. To do well, position s must compute sin(10 x_s) for the benefit of *later* positions
(pre-caching); myopic training removes exactly that incentive.

Model: a GPT-2 trunk (2 layers, d = 128, 2 heads, ReLU MLP, learned positions) with a linear embedding
of the two inputs and a linear head, as in the official code. Loss: Huber (delta 1). "Normalized" loss
is loss / p, i.e. roughly the loss on the z = 1 positions; the trivial model (copy x when z = 0, predict
0 otherwise) sits near 1.26. The probe: ridge regression of sin(10 x_n) on the hidden state at n,
fitted on held-out sequences and scored (R^2) on others.

Frequency curriculum (hf-ext's addition, for a CPU budget): sin(10 x) is a high-frequency target that
gradient descent finds slowly (the official runs took ~100M sequences). With ``curriculum=c`` the
training data's frequency ramps linearly from 1 to ``freq`` over the first c of the steps, then stays
there; the model and the evaluation are the paper's (always at ``freq``). Only vanilla training can
follow the ramp into pre-caching: sin(w x_s) is never useful at position s itself, so myopic training
has no reason to compute it there. ``curriculum=0`` trains at ``freq`` throughout, as the paper did.

Example:
    >>> from hf_ext.myopic.synthetic import SyntheticConfig, run_synthetic
    >>> report = run_synthetic(SyntheticConfig(steps=200))  # doctest: +SKIP
    >>> report["vanilla"]["normalized_loss"], report["myopic"]["normalized_loss"]  # doctest: +SKIP
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SyntheticConfig:
    p: float = 0.3                # probability that a position's target is the sum over past inputs
    lags: int = 10
    freq: float = 10.0            # the target's frequency: sin(freq * x)
    seq_len: int = 64
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 2
    steps: int = 20000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.01          # fraction of steps; cosine decay after
    curriculum: float = 0.3       # fraction of steps over which the training frequency ramps 1 -> freq
    max_grad_norm: float = 1.0
    eval_sequences: int = 2048
    probe_sequences: int = 1024   # half to fit the probe, half to score it
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"p={self.p}: give a probability in (0, 1]")
        if self.seq_len <= self.lags:
            raise ValueError(f"seq_len={self.seq_len} must exceed lags={self.lags}")
        if not 0 <= self.curriculum <= 1:
            raise ValueError(f"curriculum={self.curriculum}: give a fraction of the steps in [0, 1]")

    def train_freq(self, step: int) -> float:
        """The frequency of the training data at ``step`` (the curriculum's ramp, then ``freq``)."""
        ramp = self.curriculum * self.steps
        return self.freq if step >= ramp else 1 + (self.freq - 1) * step / ramp


def sample(cfg: SyntheticConfig, n: int, generator: torch.Generator, freq: float | None = None):
    """x, z, y: (n, T) each; the target's frequency is ``cfg.freq`` unless ``freq`` is given."""
    x = torch.randn(n, cfg.seq_len, generator=generator)
    z = (torch.rand(n, cfg.seq_len, generator=generator) < cfg.p).float()
    s = F.pad(torch.sin((cfg.freq if freq is None else freq) * x), (cfg.lags, 0))  # (n, lags + T)
    past = sum(s[:, cfg.lags - i: cfg.lags - i + cfg.seq_len] for i in range(1, cfg.lags + 1))
    return x, z, z * past + (1 - z) * x


class SyntheticRegressor(nn.Module):
    """(x, z) per position -> y per position, on a transformers GPT2Model trunk."""

    def __init__(self, cfg: SyntheticConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.embed = nn.Linear(2, cfg.d_model)
        self.trunk = GPT2Model(GPT2Config(n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                          n_positions=cfg.seq_len, vocab_size=1, bos_token_id=None,
                                          eos_token_id=None, activation_function="relu", resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0))
        self.trunk.set_attn_implementation(attn_implementation)
        self.head = nn.Linear(cfg.d_model, 1)

    def forward(self, x, z, output_hidden_states: bool = False):           # (B, T) each
        out = self.trunk(inputs_embeds=self.embed(torch.stack([x, z], -1)), use_cache=False,
                         output_hidden_states=output_hidden_states)
        return self.head(out.last_hidden_state).squeeze(-1), out.hidden_states


def normalized_loss(pred, y, p: float) -> float:
    return float(F.huber_loss(pred, y, delta=1.0)) / p


MODELS = ("vanilla", "myopic")
CURVE_EVERY = 1000                # steps per point of the reported training-loss curve
LOG_EVERY = 50                    # the training loss is read (a sync) every LOG_EVERY steps


def train(cfg: SyntheticConfig, myopic: bool, progress: bool = True, accelerator=None):
    """Train one model (fresh samples every step). Returns (model, log): ``log`` has ``train_seconds`` and
    ``train_loss_curve``, the mean training Huber loss (not normalized) of every ``CURVE_EVERY`` steps,
    read from every ``LOG_EVERY``-th step, which tells a plateau from a slow descent."""
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from ..training import optimize
    from .attention import enable_myopic

    acc = accelerator or Accelerator()
    torch.manual_seed(cfg.seed)
    model = SyntheticRegressor(cfg, "eager")
    if myopic:
        enable_myopic(model.trunk)
    else:
        model.trunk.set_attn_implementation("sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup * cfg.steps), cfg.steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    gen = torch.Generator().manual_seed(cfg.seed + 1)                      # train stream

    def step_loss(step: int) -> torch.Tensor:
        x, z, y = (a.to(acc.device) for a in sample(cfg, cfg.batch_size, gen, cfg.train_freq(step)))
        return F.huber_loss(model(x, z)[0], y, delta=1.0)

    t0 = time.perf_counter()
    losses = optimize(acc, model, opt, sched, step_loss, cfg.steps, f"synthetic {'myopic' if myopic else 'vanilla'}",
                      progress, max_grad_norm=cfg.max_grad_norm, log_every=LOG_EVERY)
    seconds = time.perf_counter() - t0
    return acc.unwrap_model(model), {"train_seconds": seconds, "train_loss_curve": loss_curve(losses, LOG_EVERY)}


def loss_curve(losses: list[float], log_every: int, every: int = CURVE_EVERY) -> list[float]:
    """Mean of the logged losses (one per ``log_every`` steps) over each window of ``every`` steps."""
    per = max(every // log_every, 1)
    return [sum(losses[i:i + per]) / len(losses[i:i + per]) for i in range(0, len(losses), per)]


def ridge_r2(h_fit, t_fit, h_test, t_test, lam: float = 1e-3) -> float:
    """R^2 on (h_test, t_test) of a ridge probe fitted on (h_fit, t_fit); h (N, D), t (N,), centred."""
    mu_h, mu_t = h_fit.mean(0), t_fit.mean()
    a, b = (h_fit - mu_h).double(), (t_fit - mu_t).double()
    gram = a.T @ a
    w = torch.linalg.solve(gram + lam * gram.diagonal().mean() * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
    pred = (h_test - mu_h).double() @ w + mu_t
    return float(1 - ((t_test - pred) ** 2).sum() / ((t_test - t_test.mean()) ** 2).sum())


@torch.no_grad()
def evaluate(model, cfg: SyntheticConfig) -> dict:
    """Normalized loss on held-out sequences, and the probe R^2 of sin(10 x_n) per layer."""
    model.eval()
    dev = next(model.parameters()).device
    x, z, y = sample(cfg, cfg.eval_sequences, torch.Generator().manual_seed(10_000 + cfg.seed))
    pred = torch.cat([model(x[i:i + 256].to(dev), z[i:i + 256].to(dev))[0].cpu()
                      for i in range(0, len(x), 256)])
    px, pz, _ = sample(cfg, cfg.probe_sequences, torch.Generator().manual_seed(20_000 + cfg.seed))
    hs = model(px.to(dev), pz.to(dev), output_hidden_states=True)[1]       # (L+1) x (N, T, D)
    target = torch.sin(cfg.freq * px).flatten()
    half = cfg.probe_sequences // 2 * cfg.seq_len
    r2 = {}
    for layer in range(1, len(hs)):
        h = hs[layer].reshape(-1, hs[layer].shape[-1]).cpu()
        r2[f"probe_r2_layer{layer}"] = ridge_r2(h[:half], target[:half], h[half:], target[half:])
    return {"normalized_loss": normalized_loss(pred, y, cfg.p), **r2}


def trivial_loss(cfg: SyntheticConfig) -> float:
    """Normalized loss of the best model that ignores the past: copy x when z = 0, else predict 0."""
    x, z, y = sample(cfg, cfg.eval_sequences, torch.Generator().manual_seed(10_000 + cfg.seed))
    return normalized_loss((1 - z) * x, y, cfg.p)


def run_synthetic(cfg: SyntheticConfig | None = None, progress: bool = True, models=MODELS) -> dict:
    """Train vanilla and myopic models (or those of ``models``) with the same data stream and seed;
    evaluate each. Returns {"config", "trivial_normalized_loss", name: {measures, train log}}."""
    cfg = cfg or SyntheticConfig()
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"models={list(models)}: choose one or more of {', '.join(MODELS)}")
    report = {"config": asdict(cfg), "trivial_normalized_loss": trivial_loss(cfg)}
    for name in (m for m in MODELS if m in models):
        model, log = train(cfg, name == "myopic", progress)
        report[name] = {**evaluate(model, cfg), **log}
    return report
