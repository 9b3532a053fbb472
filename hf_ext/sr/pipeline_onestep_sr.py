"""``OneStepSRPipeline``: LR image -> VAE encode -> one transformer step -> VAE decode (TSD-SR / TinySR).

The LR image is upsampled (bicubic) to the output size and encoded; its latent z_lr is the noisy latent
of the transformer's fixed timestep (sigma = timestep / 1000, flow matching), so one velocity prediction
gives z_hr = z_lr - sigma * v(z_lr), which is decoded. Large images are processed in overlapping LR tiles,
blended without seams (``tiling.py``), and the colours are taken from the upsampled LR image
(``color_fix="wavelet"`` or ``"adain"``, ``ops.py``). The fixed prompt and timestep live in the
transformer (pre-cached in a TinySR model), so no text encoder or scheduler is needed.

Example:
    >>> pipe = OneStepSRPipeline.from_pretrained("out/tinysr")                           # doctest: +SKIP
    >>> pipe(low_res, upscale=4, tile=64, color_fix="wavelet").images[0]                  # doctest: +SKIP
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from .modeling_onestep_sr import OneStepSRTransformer2DModel
from .ops import adain_color_fix, wavelet_color_fix
from .tiling import progress_enabled, tiled_upscale

COLOR_FIXES = {"wavelet": wavelet_color_fix, "adain": adain_color_fix, None: None}


class OneStepSRPipeline(DiffusionPipeline):
    """One-step diffusion super-resolution with a ``AutoencoderKL`` and a ``OneStepSRTransformer2DModel``."""

    model_cpu_offload_seq = "vae->transformer->vae"

    def __init__(self, vae: AutoencoderKL, transformer: OneStepSRTransformer2DModel):
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False)   # [-1, 1] tensors

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> scaled latent (B, C, H/f, W/f)."""
        z = self.vae.encode(x).latent_dist.mode()
        return (z - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return self.vae.decode(z).sample

    def step(self, z_lr: torch.Tensor) -> torch.Tensor:
        """z_hr = z_lr - sigma * v(z_lr), the one step."""
        return z_lr - self.transformer.config.timestep / 1000 * self.transformer(z_lr)

    def upscale_tile(self, lr: torch.Tensor, upscale: int) -> torch.Tensor:
        """LR (B, 3, h, w) in [-1, 1] -> SR (B, 3, s*h, s*w), padded inside to the latent grid."""
        h, w = lr.shape[-2:]
        m = self.vae_scale_factor * self.transformer.config.patch_size
        H, W = math.ceil(upscale * h / m) * m, math.ceil(upscale * w / m) * m
        up = F.interpolate(lr, scale_factor=upscale, mode="bicubic", align_corners=False)
        up = F.pad(up, (0, W - up.shape[-1], 0, H - up.shape[-2]), mode="replicate")
        return self.decode(self.step(self.encode(up)))[..., :upscale * h, :upscale * w]

    @torch.no_grad()
    def __call__(self, image, upscale: int = 4, tile: int = 64, tile_overlap: int = 8,
                 color_fix: str | None = "wavelet", output_type: str = "pil", return_dict: bool = True):
        """Super-resolve ``image`` (PIL, numpy HWC in [0, 1], tensor BCHW in [0, 1], or a list) by ``upscale``.

        ``tile`` and ``tile_overlap`` are in LR pixels and bound the memory; ``color_fix`` takes colours
        from the bicubic upsampled input (``"wavelet"``, ``"adain"`` or None).
        """
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix={color_fix!r}; use one of {list(COLOR_FIXES)}")
        if int(upscale) != upscale or upscale < 1:
            raise ValueError(f"upscale={upscale}; give a whole factor >= 1")
        lr = self.image_processor.preprocess(image).to(self.device, self.vae.dtype)      # (B, 3, h, w), [-1, 1]
        sr = tiled_upscale(lambda t: self.upscale_tile(t, upscale), lr, upscale, tile, tile_overlap,
                           progress=progress_enabled(self))
        if color_fix is not None:
            ref = F.interpolate(lr, scale_factor=upscale, mode="bicubic", align_corners=False)
            sr = COLOR_FIXES[color_fix](sr, ref)
        images = self.image_processor.postprocess(sr.clamp(-1, 1).float(), output_type=output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
