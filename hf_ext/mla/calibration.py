"""Calibration passes of the source model for MLA upcycling (statistics only, no weights change)."""
from __future__ import annotations

import torch


@torch.no_grad()
def collect_stats(model, calib_ids: torch.Tensor, window: int = 512, progress: bool = True):
    """Per layer C = E[x x^T] (float64) and mu = E[x] of the attention input (after input_layernorm)."""
    from tqdm.auto import tqdm

    layers = model.model.layers
    h = model.config.hidden_size
    C = [torch.zeros(h, h, dtype=torch.float64) for _ in layers]
    mu = [torch.zeros(h, dtype=torch.float64) for _ in layers]
    n = 0

    def hook(i):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, h).double().cpu()
            C[i].add_(x.T @ x)
            mu[i].add_(x.sum(0))
        return fn

    handles = [layer.self_attn.q_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        ids = calib_ids.flatten()
        chunks = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)] or [ids]
        for w in tqdm(chunks, desc="mla: calibration", unit="window", disable=not progress, leave=False):
            model(input_ids=w[None].to(device), use_cache=False)
            n += len(w)
    finally:
        for hd in handles:
            hd.remove()
    return [c / n for c in C], [m / n for m in mu], n


@torch.no_grad()
def attention_distances(model, calib_ids: torch.Tensor, window: int = 512, n_windows: int = 4,
                        progress: bool = True) -> torch.Tensor:
    """(L, window) distribution of attention mass over query-key distance d = t - s, per layer, averaged
    over heads and queries of the source on calibration windows (eager attention, which returns weights)."""
    from tqdm.auto import tqdm

    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    L = model.config.num_hidden_layers
    hist = torch.zeros(L, window, dtype=torch.float64)
    ids = calib_ids.flatten()
    chunks = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:n_windows] or [ids]
    device = next(model.parameters()).device
    try:
        for w in tqdm(chunks, desc="mla: attention distances", disable=not progress, leave=False):
            T = len(w)
            dist = (torch.arange(T)[:, None] - torch.arange(T)[None]).clamp_min(0).flatten()  # (T*T,)
            out = model(input_ids=w[None].to(device), output_attentions=True, use_cache=False)
            for li, a in enumerate(out.attentions):                            # (1, H, T, T)
                hist[li, :T] += torch.bincount(dist, weights=a[0].double().mean(0).flatten().cpu(), minlength=T)
    finally:
        model.set_attn_implementation(impl)
    return hist / hist.sum(-1, keepdim=True)
