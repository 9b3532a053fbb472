"""One-step diffusion SR (TSD-SR, https://arxiv.org/abs/2411.18263; TinySR, https://arxiv.org/abs/2508.17434).

- ``modeling_onestep_sr.py``: ``OneStepSRTransformer2DModel`` (its ``sigma``, pre-cached and text-free layouts).
- ``modeling_sepconv_vae.py``: ``SepConvAutoencoderKL``, TinySR's VAE with depthwise-separable convs.
- ``pipeline_onestep_sr.py``: ``OneStepSRPipeline`` (encode, one step, decode; latent scaling; remote code).
- ``ops.py``: the colour fixes; ``tiling.py``: tiled inference (also Real-ESRGAN's).
- ``tsdsr.py``: TSD-SR's released SD3 + LoRA layout (``TSDSRPipeline``) and its conversion to this pipeline.
- ``training.py``: the VAE and teacher-transformer training loops (``fit``, through accelerate).
The first five files ship beside every saved ``OneStepSRPipeline`` (``add_remote_code``), so they import only
each other (single-dot relative imports), torch and diffusers.

Example:
    >>> from hf_ext.sr.onestep import OneStepSRPipeline
    >>> pipe = OneStepSRPipeline.from_pretrained("tests/fixtures/sr_teacher")   # doctest: +SKIP
"""
from .modeling_onestep_sr import OneStepSRTransformer2DModel
from .modeling_sepconv_vae import SepConv2d, SepConvAutoencoderKL
from .ops import adain_color_fix, wavelet_color_fix
from .pipeline_onestep_sr import OneStepSRPipeline, scale_latents, unscale_latents
from .tiling import tiled_upscale
from .training import train_onestep, train_vae
from .tsdsr import TSDSRError, TSDSRPipeline, load_tsdsr_lora

__all__ = ["OneStepSRPipeline", "OneStepSRTransformer2DModel", "SepConv2d", "SepConvAutoencoderKL", "TSDSRError",
           "TSDSRPipeline", "adain_color_fix", "load_tsdsr_lora", "scale_latents", "tiled_upscale", "train_onestep",
           "train_vae", "unscale_latents", "wavelet_color_fix"]
