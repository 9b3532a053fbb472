"""TinySR's distillation: a pruned student pipeline learns its teacher's one-step latents and images.

TinySR (https://arxiv.org/abs/2508.17434) distils after pruning: on the same inputs, the student's transformer
learns the teacher's one-step latents and its VAE decoder the teacher's images (``distill``). The teacher
labels every input, so the LR images can come from any degradation. The loop is the one-step models' ``fit``
(``hf_ext.sr.onestep.training``), through accelerate.

Example:
    >>> from hf_ext.sr.data import sr_batches
    >>> log = distill(student, teacher, sr_batches("train", 96, 8, (4,)), steps=1000)     # doctest: +SKIP
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from ..onestep.pipeline_onestep_sr import unscale_latents
from ..onestep.training import fit, latents


def distill(student, teacher, batches: Iterator, steps: int, lr: float = 2e-4, pixel_weight: float = 1.0,
            output_weight: float = 0.0, progress: bool = True, accelerator=None) -> dict:
    """Train ``student`` (a ``OneStepSRPipeline``, possibly pruned) to reproduce ``teacher``: the student's one
    step must land on the teacher's latent (L1), and the student's decoder must turn the teacher's latent into
    the teacher's image (L1, weight ``pixel_weight``). Its encoder learns through the latent term. With
    ``output_weight`` the student's whole path (its encoder, step and decoder, as at inference) is also held to
    the teacher's image: the two per-part terms leave the parts' errors free to compound. Trains through
    ``accelerator`` (default: a new ``Accelerator()``); returns the log of ``fit``."""
    teacher.transformer.requires_grad_(False).eval()
    teacher.vae.requires_grad_(False).eval()
    sigma = teacher.transformer.sigma                                # the student keeps the teacher's timestep
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

    return fit(parts, loss_fn, batches, steps, lr, "TinySR distillation", progress, accelerator=accelerator)
