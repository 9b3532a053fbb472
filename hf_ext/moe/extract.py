"""Read-ME expert extraction: which neurons of each dense MLP form the shared and the routed experts.

Paper: Read-ME (Cai et al., NeurIPS 2024), https://arxiv.org/abs/2410.19123. Record each MLP's
intermediate activation (the input of its down projection: act(gate(x)) * up(x) for a gated MLP,
act(fc1(x)) for a plain one) on calibration text, with every token assigned to one of D clusters (the
domain label of its document, or k-means on its activation pattern). Per cluster, the top-p fraction
of neurons by mean |activation| is that cluster's mask; the shared expert is the intersection of all
masks and routed expert d is mask_d minus the shared part. Every mask has round(p * N) neurons, so every
routed expert has the same size and a token always uses p * N neurons (shared + its expert).

Example:
    >>> stats = activation_stats(model, batches, clusters=4)        # doctest: +SKIP
    >>> experts = expert_masks(stats, top_p=0.5)                      # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import HfExtError


class MoEError(HfExtError, ValueError):
    """Unsupported MLPs, impossible expert counts or fractions, bad cache settings."""


GATED = ("gate_proj", "up_proj", "down_proj")           # Llama, Qwen2, Mistral, SmolLM2
PLAIN = (("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"))


def mlp_kind(mlp: torch.nn.Module) -> tuple[str, list[str], str]:
    """("gated" | "plain", names of the input projections, name of the down projection), or a ``MoEError``
    listing what is supported."""
    if all(hasattr(mlp, n) for n in GATED):
        return "gated", ["gate_proj", "up_proj"], "down_proj"
    for up, down in PLAIN:
        if hasattr(mlp, up) and hasattr(mlp, down):
            return "plain", [up], down
    raise MoEError(f"{type(mlp).__name__} is not an MLP hf-ext can split into experts; supported: gated "
                   f"({'/'.join(GATED)}: Llama, Qwen2, Mistral) and plain ({', '.join('/'.join(p) for p in PLAIN)})")


def decoder_mlps(model) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise MoEError(f"{type(model).__name__} has no model.layers; Read-ME conversion supports decoder-only LMs")
    mlps = [layer.mlp for layer in layers]
    for m in mlps:
        mlp_kind(m)
    return mlps


@dataclass
class ActivationStats:
    """Per layer: summed |activation| per (cluster, neuron) (L, D, N) and tokens per cluster (D,)."""

    abs_sum: torch.Tensor
    tokens: torch.Tensor
    assignments: list[torch.Tensor]          # per batch: the cluster of every (non-pad) token

    @property
    def mean(self) -> torch.Tensor:
        return self.abs_sum / self.tokens.clamp_min(1)[None, :, None]


def _run_collect(model, mlps, batches, on_batch):
    """Run every batch; ``on_batch(i, acts, keep)`` gets the |down-projection inputs| of all layers
    (L, tokens, N) for the non-pad tokens, batch by batch (nothing is kept across batches)."""
    acts, handles = [], []
    for m in mlps:
        down = getattr(m, mlp_kind(m)[2])
        handles.append(down.register_forward_pre_hook(lambda mod, args: acts.append(args[0].detach().abs().float())))
    try:
        for i, b in enumerate(batches):
            acts.clear()
            model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
            keep = (b["attention_mask"] if b.get("attention_mask") is not None else torch.ones_like(b["input_ids"])).bool()
            on_batch(i, torch.stack([a[keep] for a in acts]), keep)                 # (L, tokens, N)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_stats(model, batches, clusters: int, labels=None, kmeans_iters: int = 20, seed: int = 0,
                     sketch_dim: int = 256) -> ActivationStats:
    """Mean |activation| of every MLP neuron per token cluster over ``batches`` (dicts with input_ids,
    attention_mask). ``labels[i]`` is the domain of batch i's documents ((B,) ints in [0, clusters));
    without labels, tokens are clustered by k-means on their activation patterns (all layers, L2-normalised,
    sketched to ``sketch_dim`` dimensions by a fixed random projection), which takes a second pass."""
    mlps = decoder_mlps(model)
    batches = list(batches)
    if labels is not None:
        assign = [torch.as_tensor(y)[:, None].expand_as(b["attention_mask"] if b.get("attention_mask") is not None
                                                        else b["input_ids"])
                  for y, b in zip(labels, batches)]
        keeps = [(b["attention_mask"] if b.get("attention_mask") is not None else torch.ones_like(b["input_ids"])).bool()
                 for b in batches]
        assign = [a[k] for a, k in zip(assign, keeps)]
    else:
        feats, proj = [], {}

        def sketch(i, a, keep):
            flat = torch.nn.functional.normalize(a.permute(1, 0, 2).flatten(1), dim=1)   # (tokens, L * N)
            if "R" not in proj:
                g = torch.Generator().manual_seed(seed)
                proj["R"] = torch.randn(flat.shape[1], sketch_dim, generator=g) / sketch_dim ** 0.5
            feats.append(flat @ proj["R"])                                               # (tokens, sketch_dim)
        _run_collect(model, mlps, batches, sketch)
        ids = kmeans(torch.cat(feats), clusters, kmeans_iters, seed)
        assign = list(ids.split([len(f) for f in feats]))
    state = {}

    def accumulate(i, a, keep):
        c = assign[i]
        if c.numel() and (c.min() < 0 or c.max() >= clusters):
            raise MoEError(f"domain labels must lie in [0, {clusters}); got {c.min().item()}..{c.max().item()}")
        if "abs_sum" not in state:
            state["abs_sum"], state["tokens"] = torch.zeros(a.shape[0], clusters, a.shape[2]), torch.zeros(clusters)
        state["abs_sum"].index_add_(1, c, a)
        state["tokens"] += torch.bincount(c, minlength=clusters).float()
    _run_collect(model, mlps, batches, accumulate)
    return ActivationStats(state["abs_sum"], state["tokens"], assign)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cluster rows of ``x`` (M, F) into ``k`` groups (k-means++ start, Lloyd steps); returns (M,) ids."""
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        d = torch.cdist(x, centers).min(1).values ** 2
        centers = torch.cat([centers, x[torch.multinomial(d / d.sum(), 1, generator=g)]])
    for _ in range(iters):
        ids = torch.cdist(x, centers).argmin(1)
        for j in range(k):
            if (ids == j).any():
                centers[j] = x[ids == j].mean(0)
    return torch.cdist(x, centers).argmin(1)


@dataclass
class ExpertMasks:
    """Per layer l: the shared expert's neurons (S_l,) and each routed expert's neurons (D, K_l), sorted.
    S_l varies with the layer's statistics; S_l + K_l = round(top_p * N) everywhere."""

    shared: list[torch.Tensor]
    routed: list[torch.Tensor]
    top_p: float
    neurons: int

    @property
    def active_fraction(self) -> float:
        """Fraction of the dense MLP's neurons a token uses (shared + one routed expert)."""
        return (len(self.shared[0]) + self.routed[0].shape[1]) / self.neurons


def expert_masks(stats: ActivationStats, top_p: float) -> ExpertMasks:
    """Top-p neurons per cluster; shared = their intersection, routed d = mask d minus shared (per layer)."""
    if not 0 < top_p <= 1:
        raise MoEError(f"top_p={top_p} must lie in (0, 1]: the fraction of each MLP's neurons a token uses")
    L, D, N = stats.abs_sum.shape
    if D > N:
        raise MoEError(f"{D} experts need at least {D} neurons per MLP; this model has {N}")
    P = max(1, round(top_p * N))
    top = stats.mean.topk(P, dim=-1).indices                                        # (L, D, P)
    masks = torch.zeros(L, D, N, dtype=torch.bool).scatter_(2, top, True)
    shared = masks.all(1)                                                           # (L, N)
    routed = masks & ~shared[:, None]                                               # (L, D, N), P - S_l each
    return ExpertMasks([shared[l].nonzero().flatten() for l in range(L)],
                       [routed[l].nonzero()[:, 1].view(D, -1) for l in range(L)], top_p, N)


def router_targets(masks: ExpertMasks, acts_top: list[torch.Tensor]) -> torch.Tensor:
    """Per token, the expert whose routed mask best overlaps its most activated neurons, summed over layers.
    ``acts_top``: per layer, (tokens, N) bool of each token's top-p neurons."""
    score = 0
    for layer, routed in enumerate(masks.routed):
        D = routed.shape[0]
        member = torch.zeros(D, masks.neurons, dtype=torch.bool)
        member.scatter_(1, routed, True)
        score = score + acts_top[layer].float() @ member.float().T                   # (tokens, D)
    return score.argmax(1)
