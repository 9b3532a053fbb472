"""Training loops for the one-step SR models, through accelerate: the VAE, the teacher transformer, and the
TinySR student's distillation from its teacher.

- ``train_vae``: an ``AutoencoderKL`` (or its SepConv form) on image batches, L1 + a small KL.
- ``train_onestep``: a ``OneStepSRTransformer2DModel`` on (lr_up, hr) batches with a frozen VAE: the one step
  z_lr - sigma * v(z_lr) must land on z_hr (L1 in latent space; TSD-SR / TinySR's latent loss).
- ``distill``: a student pipeline learns the teacher pipeline's latents (transformer) and images (VAE decoder)
  on the same inputs: TinySR's distillation after pruning.

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
        progress: bool = True, warmup: int = 100) -> dict:
    """AdamW with warmup then cosine decay on ``model``'s trainable parameters, ``loss_fn(model, batch)`` per
    step, through accelerate. Returns a log: the loss every 50 steps (mean of the last 50) and the final loss."""
    from accelerate import Accelerator
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps={steps}: train for at least one step")
    acc = Accelerator()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(warmup, steps // 10), steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    model.train()
    curve = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        loss = loss_fn(model, next(batches))
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.item())
        bar.set_postfix(loss=f"{sum(curve[-50:]) / len(curve[-50:]):.4f}")
    acc.unwrap_model(model).eval()
    every = [sum(curve[max(0, i - 49):i + 1]) / len(curve[max(0, i - 49):i + 1]) for i in range(49, steps, 50)]
    return {"steps": steps, "lr": lr, "loss_every_50": [round(v, 5) for v in every],
            "final_loss": sum(curve[-50:]) / len(curve[-50:])}


def vae_loss(vae, x: torch.Tensor, kl_weight: float = 1e-6) -> torch.Tensor:
    """L1 reconstruction of x (B, 3, H, W) in [-1, 1] from the posterior mode (the latent the SR pipelines use;
    sampling it makes short CPU runs converge far slower), plus ``kl_weight`` * KL to keep the latents tame."""
    post = vae.encode(x).latent_dist
    return F.l1_loss(vae.decode(post.mode()).sample, x) + kl_weight * post.kl().mean() / x[0].numel()


def train_vae(vae, images: Iterator[torch.Tensor], steps: int, lr: float = 1e-3, progress: bool = True) -> dict:
    """Train ``vae`` on ``images`` ((B, 3, H, W) in [-1, 1] batches); returns the log of ``fit``."""
    return fit(vae, lambda m, x: vae_loss(m, x.to(vae.device)), images, steps, lr, "SR VAE", progress)


def latents(vae, x: torch.Tensor, latent_math: str = "hf-ext") -> torch.Tensor:
    """The scaled latent of x in [-1, 1] from the posterior mode. ``OneStepSRPipeline.encode`` computes the same
    for hf-ext's math; for TSD-SR's, which samples at inference, training uses the sample's mean, so that the
    teacher's and the student's encoders (whose posteriors differ) are compared without noise."""
    return scale_latents(vae.encode(x).latent_dist.mode(), vae.config, latent_math)


def train_onestep(transformer, vae, batches: Iterator, steps: int, lr: float = 5e-4, pixel_weight: float = 0.0,
                  progress: bool = True, latent_math: str = "hf-ext") -> dict:
    """Train ``transformer`` so that z_lr - sigma * v(z_lr) = z_hr, with ``vae`` frozen; ``batches`` yield
    (lr_up, hr, scale) in [-1, 1] (``hf_ext.sr.data.sr_batches``). With ``pixel_weight`` the decoded step is also
    held to the HR image (L1 through the frozen decoder): the latent loss alone does not follow pixel error."""
    vae.requires_grad_(False).eval()
    sigma = transformer.config.timestep / 1000

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

    return fit(transformer, loss_fn, batches, steps, lr, "SR one-step transformer", progress)


def distill(student, teacher, batches: Iterator, steps: int, lr: float = 2e-4, pixel_weight: float = 1.0,
            output_weight: float = 0.0, progress: bool = True) -> dict:
    """Train ``student`` (a ``OneStepSRPipeline``, possibly pruned) to reproduce ``teacher``: the student's one
    step must land on the teacher's latent (L1), and the student's decoder must turn the teacher's latent into
    the teacher's image (L1, weight ``pixel_weight``). Its encoder learns through the latent term. With
    ``output_weight`` the student's whole path (its encoder, step and decoder, as at inference) is also held to
    the teacher's image: the two per-part terms leave the parts' errors free to compound."""
    teacher.transformer.requires_grad_(False).eval()
    teacher.vae.requires_grad_(False).eval()
    sigma = teacher.transformer.config.timestep / 1000
    parts = torch.nn.ModuleDict({"vae": student.vae, "transformer": student.transformer})
    math = teacher.config.latent_math
    if student.config.latent_math != math:
        raise ValueError(f"the student's latent_math={student.config.latent_math!r} differs from the teacher's {math!r}")

    def loss_fn(model, batch):
        up = batch[0].to(teacher.device)
        with torch.no_grad():
            z_t = latents(teacher.vae, up, math)
            z_t = z_t - sigma * teacher.transformer(z_t)
            img_t = teacher.decode(z_t)
        vae = model["vae"]
        unscale = lambda z: unscale_latents(z, vae.config, math)                               # noqa: E731
        z_s = latents(vae, up, math)
        z_s = z_s - sigma * model["transformer"](z_s)
        loss = F.l1_loss(z_s, z_t)
        if pixel_weight:
            loss = loss + pixel_weight * F.l1_loss(vae.decode(unscale(z_t)).sample, img_t)
        if output_weight:
            loss = loss + output_weight * F.l1_loss(vae.decode(unscale(z_s)).sample, img_t)
        return loss

    return fit(parts, loss_fn, batches, steps, lr, "TinySR distillation", progress)
