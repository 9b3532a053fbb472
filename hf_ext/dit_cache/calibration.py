"""Calibration runs: the denoising trajectory a CA-SVD calibration measures channels on.

``ddim_trajectory(transformer, ...)`` runs class-conditional DDIM sampling (DiT-style inputs: latents,
timestep, class labels; classifier-free guidance batched) from seeded noise; ``relative_step_error``
compares one cached step with the exact one.
"""
from __future__ import annotations

import torch

from .config import ICCError


def _check_dit(transformer) -> None:
    if getattr(transformer.config, "num_embeds_ada_norm", None) is None:
        raise ICCError(f"{type(transformer).__name__} is not a class-conditional DiT; the built-in calibration run "
                       "samples DiT-style. Calibrate through the API with your own run=... (a few pipeline steps)")


@torch.no_grad()
def ddim_trajectory(transformer, samples: int = 4, steps: int = 10, guidance: float = 1.5, seed: int = 0,
                    on_step=None, scheduler=None) -> torch.Tensor:
    """DDIM sampling (or ``scheduler``'s) of ``samples`` random classes; returns the final latents."""
    from diffusers import DDIMScheduler

    _check_dit(transformer)
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    classes = cfg.num_embeds_ada_norm
    labels = torch.randint(0, classes, (samples,), generator=g)
    x = torch.randn(samples, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    sched = (DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False) if scheduler is None
             else type(scheduler).from_config(scheduler.config))
    sched.set_timesteps(steps)
    null = torch.full_like(labels, classes)
    for i, t in enumerate(sched.timesteps):
        out = transformer(torch.cat([x, x]), timestep=t.expand(2 * samples), class_labels=torch.cat([labels, null])).sample
        cond, uncond = out[:, :cfg.in_channels].chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        if on_step is not None:
            on_step(i, t)
    return x
