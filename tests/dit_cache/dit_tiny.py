"""A tiny random DiT and a slowly changing sequence of calls to it, shared by the ICC tests."""
from __future__ import annotations

import torch


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2).eval()


def dit_calls(model, n: int, seed: int = 1) -> list[torch.Tensor]:
    """``n`` calls on a latent that drifts a little each call, timesteps 900, 800, ... (one sampling run)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    outs = []
    for t in range(n):
        x = x + 0.05 * torch.randn(2, 4, 8, 8, generator=g)              # a slowly changing latent
        outs.append(model(x, timestep=torch.tensor([900 - 100 * t] * 2), class_labels=torch.tensor([1, 3])).sample)
    return outs
