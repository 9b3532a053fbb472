"""A homotopy from the identity to DeepSeek's KV latent RMSNorm, run during distillation.

DeepSeek-V3 normalises the KV latent before caching it: n(c) = g * c / sqrt(mean(c^2) + eps). An upcycled
c_kv was fitted without that norm, and switching it on at once (``latent_norm_init="gain"``) costs a lot of
perplexity (SmolLM2 at 32 + 32: 145 -> 2743 training-free). The epsilon is the dial between the two: with
e >> mean(c^2) the norm is linear, with e = eps it is DeepSeek's. So distillation starts at the identity and
turns the dial while the student adapts:

    lam(t)  = lam0 + (1 - lam0) * t / T           # the "active" fraction P / (P + e), linear in steps
    e(t)    = max(P_ref * (1 - lam) / lam, eps)   # P_ref: the latent's mean square at the start, per layer
    g      <- g * sqrt((P + e_new) / (P + e_old)) # P: the current mean square; a token of that size passes
                                                  # through unchanged while e moves

After ``T`` steps every norm is exactly the exported one (e = its own epsilon), and training goes on there.
Only ``kv_a_layernorm`` anneals: the query latent is exact by construction (see ``export.py``).

Example:
    >>> anneal = LatentNormAnneal(mla, steps=256)        # doctest: +SKIP
    >>> for step in range(steps): ...; anneal.step(step)  # after each optimiser step  # doctest: +SKIP
"""
from __future__ import annotations

import math

import torch

from ..errors import HfExtError

NORM_ANNEAL = 0.5   # distillation's default: anneal over the first half of the steps (chosen on a train split)
LAM0 = 1e-4   # start: the norm is the identity to ~(mean(c^2) - P) / (2 e0), e0 = 1e4 P, about 1e-4 relative


class LatentNormAnneal:
    """Drives every ``kv_a_layernorm`` of ``model`` from the identity to its own epsilon over ``steps`` steps.

    Call ``step(t)`` after optimiser step t (0-based); ``close()`` removes the hooks and leaves each norm at its
    own epsilon. The mean square of each norm's input is read by a forward pre-hook, so the model must have
    run one forward (in ``start``) before the first ``step``."""

    def __init__(self, model, steps: int):
        self.norms = [m for n, m in model.named_modules() if n.endswith("kv_a_layernorm")]
        if not self.norms:
            raise HfExtError("latent norm anneal: the model has no kv_a_layernorm; it applies to an MLA model "
                             "upcycled with UpcycleConfig(target='deepseek_v3') (latent_norm=True)")
        self.steps = max(1, steps)
        self.eps = [m.variance_epsilon for m in self.norms]
        self.power = [float("nan")] * len(self.norms)
        self.hooks = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.norms)]
        self.p_ref = None

    def _hook(self, i):
        def record(module, args):
            self.power[i] = args[0].detach().float().pow(2).mean()   # a tensor: no device sync per layer
        return record

    def epsilon(self, i: int, t: int) -> float:
        lam = LAM0 + (1 - LAM0) * min(1.0, t / self.steps)
        return max(self.p_ref[i] * (1 - lam) / lam, self.eps[i])

    @torch.no_grad()
    def start(self, model, batch, t: int = 0, p_ref: list[float] | None = None) -> list[float]:
        """Measure each latent's mean square on ``batch`` and move every norm to where step ``t`` has it.

        Resuming (``p_ref`` given, the list an earlier ``start`` returned) sets the epsilons only: the gains
        were saved with the model."""
        if p_ref is not None:
            self.p_ref = list(p_ref)
            for i, m in enumerate(self.norms):
                m.variance_epsilon = self.epsilon(i, t)
            return self.p_ref
        model(input_ids=batch, use_cache=False)
        self.p_ref = [float(p) for p in self.power]
        for i in range(len(self.norms)):
            self._move(i, self.epsilon(i, t))
        return self.p_ref

    def step(self, t: int) -> None:
        for i in range(len(self.norms)):
            self._move(i, self.epsilon(i, t + 1))
        if t + 1 >= self.steps:                            # every norm is at its own epsilon: stop measuring
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    @torch.no_grad()
    def _move(self, i: int, e_new: float) -> None:
        m = self.norms[i]
        if e_new != m.variance_epsilon:
            p = float(self.power[i])
            m.weight.mul_(math.sqrt((p + e_new) / (p + m.variance_epsilon)))
            m.variance_epsilon = e_new

    def close(self) -> None:
        for i in range(len(self.norms)):
            self._move(i, self.eps[i])
        self._remove_hooks()
