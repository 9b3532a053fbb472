"""TinySR depth pruning: search which transformer blocks to keep while the student keeps training.

TinySR (2025, https://arxiv.org/abs/2508.17434) learns the block mask m of
x_{i+1} = m_i * block_i(x_i) + (1 - m_i) * x_i (TinyFusion's recipe):
- **Dynamic Inter-block Activation.** The blocks are cut into groups of ``group_size`` consecutive blocks,
  each keeping ``keep``. A group has logits over its C(group_size, keep) options; every step draws a hard
  Gumbel-softmax sample (straight-through: discrete in the forward pass, the soft probabilities carry
  the gradient), with the temperature annealed from ``tau_start`` to ``tau_end``.
- **Expansion-Corrosion.** Groups are paired. Each group's best *neighbour* option (the highest-logit option
  sharing all but one block with the sampled one) defines a union (keep + 1 blocks: expansion) and an
  intersection (keep - 1: corrosion). A 3-way gate per pair chooses: A corrodes and B expands, both keep
  their sample, or A expands and B corrodes. A block can thus move between neighbouring groups while the
  pair keeps 2 * keep blocks, so the total stays N = groups * keep.
- After the search, ``keep_indices`` reads the most likely choice and ``surgery.keep_blocks`` builds the smaller
  model.

Example:
    >>> gates = BlockGates(num_blocks=8, group_size=4, keep=2)
    >>> int(gates.sample(tau=1.0).sum())            # always N = 4 blocks, expansion-corrosion included
    4
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn


class BlockGates(nn.Module):
    """Learnable block choice: per-group option logits and per-pair expansion-corrosion logits."""

    def __init__(self, num_blocks: int, group_size: int = 4, keep: int = 2, expansion_corrosion: bool = True):
        super().__init__()
        if num_blocks % group_size or not 1 <= keep <= group_size:
            raise ValueError(f"{num_blocks} blocks in groups of {group_size} keeping {keep}: the group size must "
                             "divide the block count and 1 <= keep <= group size")
        self.group_size, self.keep, self.groups = group_size, keep, num_blocks // group_size
        self.ec = expansion_corrosion and self.groups >= 2 and 1 <= keep < group_size
        opts = [[float(i in c) for i in range(group_size)] for c in combinations(range(group_size), keep)]
        self.register_buffer("options", torch.tensor(opts))                       # (n_opt, group_size)
        self.logits = nn.Parameter(torch.zeros(self.groups, len(opts)))           # (G, n_opt)
        self.pair_logits = nn.Parameter(torch.zeros(self.groups // 2, 3) if self.ec else torch.zeros(0, 3))

    def _neighbour(self, g: int, choice: int) -> torch.Tensor:
        """(group_size,) mask of group g's highest-logit option that differs from ``choice`` by one block."""
        shared = self.options @ self.options[choice]                              # (n_opt,) common blocks
        ok = shared == self.keep - 1
        return self.options[int(torch.where(ok, self.logits[g].detach(), -torch.inf).argmax())]

    def _combine(self, group_masks: list[torch.Tensor], choices: list[int], pair_onehots) -> torch.Tensor:
        masks = list(group_masks)
        for p, z in enumerate(pair_onehots):                                       # z (3,): corrode/keep/expand A
            a, b = 2 * p, 2 * p + 1
            grown, shrunk = [], []
            for g in (a, b):
                nb = self._neighbour(g, choices[g])
                grown.append(masks[g] + nb - masks[g] * nb)                         # union (expansion)
                shrunk.append(masks[g] * nb)                                        # intersection (corrosion)
            masks[a], masks[b] = (z[0] * shrunk[0] + z[1] * masks[a] + z[2] * grown[0],
                                  z[0] * grown[1] + z[1] * masks[b] + z[2] * shrunk[1])
        return torch.cat(masks)                                                     # (num_blocks,)

    def sample(self, tau: float) -> torch.Tensor:
        """A hard, differentiable block mask (num_blocks,) with exactly groups * keep ones."""
        onehots = F.gumbel_softmax(self.logits, tau=tau, hard=True)                 # (G, n_opt)
        choices = onehots.argmax(-1).tolist()
        pairs = F.gumbel_softmax(self.pair_logits, tau=tau, hard=True) if self.ec else []
        return self._combine(list(onehots @ self.options), choices, pairs)

    @torch.no_grad()
    def most_likely(self) -> torch.Tensor:
        """The mask of the highest-logit choices (no noise)."""
        choices = self.logits.argmax(-1).tolist()
        pairs = F.one_hot(self.pair_logits.argmax(-1), 3).float() if self.ec else []
        return self._combine([self.options[c] for c in choices], choices, pairs)

    def keep_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.most_likely().tolist()) if m > 0.5]


@dataclass
class DepthSearchConfig:
    group_size: int = 4
    keep: int = 2                       # per group: N = num_blocks / group_size * keep blocks survive
    expansion_corrosion: bool = True
    steps: int = 1000
    lr: float = 1e-4                    # the student's weights (0 freezes them: search only)
    gate_lr: float = 1e-2
    tau_start: float = 4.0
    tau_end: float = 0.1


def search_depth(student, batches, config: DepthSearchConfig, progress: bool = True, accelerator=None):
    """Train ``student`` (a ``OneStepSRTransformer2DModel``) under sampled block masks on (input, target)
    latent pairs from ``batches`` (cycled; targets from the teacher), L1 loss, through ``accelerator``
    (default: a new ``Accelerator()``).

    Returns (keep indices, gates, log). Build the pruned model with ``keep_blocks(student, keep)``.
    """
    from itertools import cycle

    from accelerate import Accelerator
    from tqdm.auto import tqdm

    c = config
    gates = BlockGates(student.config.num_layers, c.group_size, c.keep, c.expansion_corrosion).to(student.device)
    groups = [{"params": list(gates.parameters()), "lr": c.gate_lr}]
    if c.lr > 0:
        groups.append({"params": [p for p in student.parameters() if p.requires_grad], "lr": c.lr})
    acc = accelerator or Accelerator()
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    student, gates, opt = acc.prepare(student, gates, opt)
    student.train()
    curve, it = [], cycle(batches)
    for step in tqdm(range(c.steps), desc="TinySR depth search", disable=not progress):
        z, target = next(it)
        tau = c.tau_start + (c.tau_end - c.tau_start) * step / max(c.steps - 1, 1)
        loss = F.l1_loss(student(z, block_mask=gates.sample(tau)), target)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.item())
    gates = acc.unwrap_model(gates)
    return gates.keep_indices(), gates, {"loss_curve": curve, "final_loss": sum(curve[-20:]) / len(curve[-20:])}
