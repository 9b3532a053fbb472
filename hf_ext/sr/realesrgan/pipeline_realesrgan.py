"""``RealESRGANPipeline``: a Real-ESRGAN generator behind the diffusers pipeline interface, tiled.

Paper: https://arxiv.org/abs/2107.10833. The generator is one forward pass (no diffusion); the pipeline
gives it what users expect from a diffusers upscaler: PIL / numpy / tensor in and out, tiling with
blended overlaps for images of any size, an ``outscale`` other than the network's (a bicubic resize of
its output, as Real-ESRGAN's own ``--outscale`` does), and ``save_pretrained`` / ``from_pretrained``. The
tiling is the one-step pipeline's (``hf_ext/sr/onestep/tiling.py``, kept there because it ships beside that
pipeline as remote code).

Example:
    >>> from hf_ext.sr import RealESRGANPipeline, load_upscaler
    >>> pipe = RealESRGANPipeline(upscaler=load_upscaler("realesrgan-x4plus"))    # doctest: +SKIP
    >>> pipe(low_res_pil, outscale=2, tile=192).images[0]                        # doctest: +SKIP
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from ..onestep.tiling import open_images, progress_enabled, tiled_upscale


class RealESRGANPipeline(DiffusionPipeline):
    """Upscale RGB images with a Real-ESRGAN generator (``RRDBNet`` or ``SRVGGNetCompact``)."""

    model_cpu_offload_seq = "upscaler"

    def __init__(self, upscaler):
        super().__init__()
        self.register_modules(upscaler=upscaler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=False)

    @torch.no_grad()
    def __call__(self, image, outscale: float | None = None, tile: int = 256, tile_overlap: int = 16,
                 output_type: str = "pil", return_dict: bool = True):
        """Upscale ``image`` (PIL, numpy HWC in [0, 1], tensor BCHW in [0, 1], or a list of them).

        ``outscale`` defaults to the network's scale; ``tile`` (input pixels) bounds memory: the
        generator sees at most ``tile`` x ``tile`` at a time, tiles overlap by ``tile_overlap``.
        """
        scale = self.upscaler.config.scale
        x = self.image_processor.preprocess(open_images(image)).to(self.device, self.upscaler.dtype)   # (B, 3, H, W)
        y = tiled_upscale(self.upscaler, x, scale, tile, tile_overlap, progress=progress_enabled(self))
        if outscale is not None and outscale != scale:
            if outscale <= 0:
                raise ValueError(f"outscale={outscale}; give a positive scale")
            size = (round(x.shape[-2] * outscale), round(x.shape[-1] * outscale))
            y = F.interpolate(y, size=size, mode="bicubic", align_corners=False, antialias=True)
        y = y.clamp(0, 1) if output_type == "pt" else y.clamp(0, 1).float()    # numpy has no bfloat16
        images = self.image_processor.postprocess(y, output_type=output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
