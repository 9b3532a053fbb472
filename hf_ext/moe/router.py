"""Training the pre-gating router (Read-ME): per-token target experts, then distillation into the router.

Paper: https://arxiv.org/abs/2410.19123. Two kinds of targets: ``error_scores`` (the expert whose output is
closest to the dense MLPs', used by the alternating rounds in ``tune.py`` and the CLI) and ``overlap_scores``
(the expert whose routed mask best overlaps the token's most activated neurons, ``extract.router_targets``).
The loss is the paper's 0.75 * cross-entropy (label smoothing 0.1) + 0.25 * KL to the soft target
distribution (softmax of the scores / temperature). Only the router trains, through accelerate.

Example:
    >>> scores = error_scores(moe, dense, batches)                           # doctest: +SKIP
    >>> train_router(moe, batches, scores, epochs=3)                          # doctest: +SKIP
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .extract import ExpertMasks, decoder_mlps, mlp_kind


@torch.no_grad()
def overlap_scores(dense, masks: ExpertMasks, batches) -> list[torch.Tensor]:
    """Per batch, (B, T, D) scores: for every token, how many of its top-p neurons (by |activation|, per
    layer) lie in each routed expert, summed over layers. The target expert is their argmax."""
    mlps = decoder_mlps(dense)
    D, N = masks.routed[0].shape[0], masks.neurons
    P = len(masks.shared[0]) + masks.routed[0].shape[1]
    member = []
    for routed in masks.routed:                                                     # (D, N) per layer
        m = torch.zeros(D, N)
        m.scatter_(1, routed, 1.0)
        member.append(m)
    out = []
    for b in batches:
        score = torch.zeros(*b["input_ids"].shape, D)
        handles = []
        for layer, mlp in enumerate(mlps):
            def pre(mod, args, layer=layer):
                nonlocal score
                top = args[0].abs().float().topk(P, dim=-1).indices                 # (B, T, P)
                hot = torch.zeros(*top.shape[:-1], N).scatter_(-1, top, 1.0)        # (B, T, N)
                score = score + hot @ member[layer].T                               # (B, T, D)
            handles.append(getattr(mlp, mlp_kind(mlp)[2]).register_forward_pre_hook(pre))
        try:
            dense(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
        finally:
            for h in handles:
                h.remove()
        out.append(score)
    return out


@torch.no_grad()
def error_scores(moe, dense, batches) -> list[torch.Tensor]:
    """Per batch, (B, T, D) scores for Read-ME's router rounds (``tune.py``): how well each expert reproduces
    the dense MLPs for every token. In each layer, shared + routed expert d of ``moe`` runs on the dense
    model's own MLP input x; its squared error ||MoE_d(x) - MLP(x)||^2 is divided by the layer's mean
    ||MLP(x)||^2 (so every layer counts alike) and summed over layers. Scores are minus that sum over its
    per-token mean across experts, so the argmax is the least error and the scale does not depend on the model.
    """
    io = []
    hooks = [mlp.register_forward_hook(lambda mod, args, y: io.append((args[0], y))) for mlp in decoder_mlps(dense)]
    out = []
    try:
        for b in batches:
            io.clear()
            dense(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
            err = 0.0
            for (x, y), m in zip(io, (layer.mlp for layer in moe.model.layers)):             # x, y: (B, T, H)
                f = torch.promote_types(y.dtype, torch.float32)                              # bf16 sums in fp32
                base = m.expert(x, m.shared_in, m.shared_out, m.shared_in_bias) - y
                if m.out_bias is not None:
                    base = base + m.out_bias
                e = torch.stack([(base + m.expert(x, *m.routed_weights(d))).to(f).pow(2).sum(-1)
                                 for d in range(m.num_routed)], -1)                           # (B, T, D)
                err = err + e / y.to(f).pow(2).sum(-1).mean()
            out.append(-err / err.mean(-1, keepdim=True))
    finally:
        for h in hooks:
            h.remove()
    return out


def router_loss(logits: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                smoothing: float = 0.1) -> torch.Tensor:
    """0.75 * CE(argmax target, label smoothing) + 0.25 * KL(soft target || router), over ``mask``ed tokens."""
    lg, sc = logits[mask], scores[mask].float()                                     # (M, D)
    ce = F.cross_entropy(lg, sc.argmax(-1), label_smoothing=smoothing)
    kl = F.kl_div(F.log_softmax(lg, -1), F.log_softmax(sc / temperature, -1), log_target=True, reduction="batchmean")
    return 0.75 * ce + 0.25 * kl


def train_router(moe, batches, scores, epochs: int = 3, lr: float = 1e-3, temperature: float = 1.0,
                 seed: int = 0, progress: bool = True, accelerator=None) -> dict:
    """Train ``moe.router`` on ``batches`` (dicts with input_ids, attention_mask) toward ``scores``
    (``overlap_scores``). Returns the loss curve and the target accuracy of the last epoch."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    acc = accelerator or Accelerator()
    torch.manual_seed(seed)
    router = moe.router
    router.train()
    opt = torch.optim.AdamW(router.parameters(), lr=lr)
    router, opt = acc.prepare(router, opt)
    g = torch.Generator().manual_seed(seed)
    curve, hit, seen = [], 0, 0
    bar = tqdm(total=epochs * len(batches), desc="router", disable=not progress)
    for epoch in range(epochs):
        hit = seen = 0
        for i in torch.randperm(len(batches), generator=g).tolist():
            ids = batches[i]["input_ids"].to(acc.device)
            mask = batches[i].get("attention_mask", torch.ones_like(ids)).bool().to(acc.device)
            logits = router(ids)
            loss = router_loss(logits, scores[i].to(acc.device), mask, temperature)
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
            hit += int((logits.argmax(-1) == scores[i].to(acc.device).argmax(-1))[mask].sum())
            seen += int(mask.sum())
            bar.update()
    bar.close()
    acc.unwrap_model(router).eval()
    return {"loss_curve": curve, "last_epoch_target_accuracy": hit / max(seen, 1)}


@torch.no_grad()
def target_accuracy(moe, batches, scores) -> float:
    """How often the router picks the target expert, over the non-pad tokens of ``batches``."""
    hit = seen = 0
    for b, s in zip(batches, scores):
        mask = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()
        hit += int((moe.route(b["input_ids"]) == s.argmax(-1))[mask].sum())
        seen += int(mask.sum())
    return hit / max(seen, 1)
