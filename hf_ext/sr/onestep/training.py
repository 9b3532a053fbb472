"""Training loops for the one-step SR models, through accelerate: the VAE and the teacher transformer.

- ``train_vae``: an ``AutoencoderKL`` (or its SepConv form) on image batches, L1 + a small KL.
- ``train_onestep``: a ``OneStepSRTransformer2DModel`` on (lr_up, hr) batches with a frozen VAE: the one step
  z_lr - sigma * v(z_lr) must land on z_hr (L1 in latent space; TSD-SR / TinySR's latent loss).
``fit`` is the loop they share (with TinySR's distillation, ``hf_ext.sr.tinysr.distillation``). Each takes an
optional ``accelerator`` (default: a fresh ``accelerate.Accelerator()``).

Example:
    >>> from hf_ext.sr.data import sr_batches
    >>> log = train_onestep(transformer, vae, sr_batches("train", 128, 16, (2, 4)), steps=2000)   # doctest: +SKIP
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .pipeline_onestep_sr import scale_latents, unscale_latents


def fit(model: torch.nn.Module, loss_fn: Callable, batches: Iterator, steps: int, lr: float, desc: str,
        progress: bool = True, warmup: int = 100, accelerator=None) -> dict:
    """AdamW with warmup then cosine decay on ``model``'s trainable parameters, ``loss_fn(model, batch)`` per
    step, through ``accelerator`` (default: a new ``Accelerator()``). Returns a log: the loss every 50 steps
    (mean of the last 50) and the final loss."""
    from accelerate import Accelerator
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from ...training import optimize

    if steps < 1:
        raise ValueError(f"steps={steps}: train for at least one step")
    acc = accelerator or Accelerator()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(warmup, steps // 10), steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    model.train()
    curve = optimize(acc, model, opt, sched, lambda _: loss_fn(model, next(batches)), steps, desc, progress,
                     max_grad_norm=1.0)
    acc.unwrap_model(model).eval()
    every = [sum(curve[max(0, i - 49):i + 1]) / len(curve[max(0, i - 49):i + 1]) for i in range(49, steps, 50)]
    return {"steps": steps, "lr": lr, "loss_every_50": [round(v, 5) for v in every],
            "final_loss": sum(curve[-50:]) / len(curve[-50:])}


def vae_loss(vae, x: torch.Tensor, kl_weight: float = 1e-6) -> torch.Tensor:
    """L1 reconstruction of x (B, 3, H, W) in [-1, 1] from the posterior mode (the latent the SR pipelines use;
    sampling it makes short CPU runs converge far slower), plus ``kl_weight`` * KL to keep the latents tame."""
    post = vae.encode(x).latent_dist
    return F.l1_loss(vae.decode(post.mode()).sample, x) + kl_weight * post.kl().mean() / x[0].numel()


def train_vae(vae, images: Iterator[torch.Tensor], steps: int, lr: float = 1e-3, progress: bool = True,
              accelerator=None) -> dict:
    """Train ``vae`` on ``images`` ((B, 3, H, W) in [-1, 1] batches); returns the log of ``fit``."""
    return fit(vae, lambda m, x: vae_loss(m, x.to(vae.device)), images, steps, lr, "SR VAE", progress,
               accelerator=accelerator)


def latents(vae, x: torch.Tensor, latent_math: str = "hf-ext") -> torch.Tensor:
    """The scaled latent of x in [-1, 1] from the posterior mode. ``OneStepSRPipeline.encode`` computes the same
    for hf-ext's math; for TSD-SR's, which samples at inference, training uses the sample's mean, so that the
    teacher's and the student's encoders (whose posteriors differ) are compared without noise."""
    return scale_latents(vae.encode(x).latent_dist.mode(), vae.config, latent_math)


def train_onestep(transformer, vae, batches: Iterator, steps: int, lr: float = 5e-4, pixel_weight: float = 0.0,
                  progress: bool = True, latent_math: str = "hf-ext", accelerator=None) -> dict:
    """Train ``transformer`` so that z_lr - sigma * v(z_lr) = z_hr, with ``vae`` frozen; ``batches`` yield
    (lr_up, hr, scale) in [-1, 1] (``hf_ext.sr.data.sr_batches``). With ``pixel_weight`` the decoded step is also
    held to the HR image (L1 through the frozen decoder): the latent loss alone does not follow pixel error."""
    vae.requires_grad_(False).eval()
    sigma = transformer.sigma

    def loss_fn(model, batch):
        up, hr, _ = batch
        hr = hr.to(vae.device)
        with torch.no_grad():
            z_lr, z_hr = latents(vae, up.to(vae.device), latent_math), latents(vae, hr, latent_math)
        z = z_lr - sigma * model(z_lr)
        loss = F.l1_loss(z, z_hr)
        if pixel_weight:
            loss = loss + pixel_weight * F.l1_loss(vae.decode(unscale_latents(z, vae.config, latent_math)).sample, hr)
        return loss

    return fit(transformer, loss_fn, batches, steps, lr, "SR one-step transformer", progress,
               accelerator=accelerator)
