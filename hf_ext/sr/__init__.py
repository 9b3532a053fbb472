"""Super-resolution: Real-ESRGAN from its real ncnn weights, a one-step diffusion SR pipeline (TSD-SR /
TinySR style) with pre-caching and depth masks, tiled inference and colour fixes, and TinySR's compression
(depth search, VAE channel pruning, attention removal, SepConv, distillation); TSD-SR's released weights
(stock SD3 transformer and VAE with its LoRA files) in ``TSDSRPipeline``.

One folder per technique; ``data.py`` (photos, degradations, PSNR) is shared:
- ``realesrgan/``: Real-ESRGAN's generators, the ncnn reader and ``RealESRGANPipeline``.
- ``onestep/``: the one-step SR transformer, SepConv VAE and ``OneStepSRPipeline`` (the files saved pipelines
  ship as remote code), TSD-SR's release, and the teacher training loops.
- ``tinysr/``: TinySR's compression: ``compress_tinysr``, depth search, surgery, VAE pruning, distillation.

Example:
    >>> from hf_ext.sr import RealESRGANPipeline, load_upscaler
    >>> pipe = RealESRGANPipeline(load_upscaler("realesrgan-x4plus"))   # doctest: +SKIP
    >>> big = pipe(image, tile=256).images[0]                            # doctest: +SKIP
"""
from .onestep import (OneStepSRPipeline, OneStepSRTransformer2DModel, SepConv2d, SepConvAutoencoderKL, TSDSRError,
                      TSDSRPipeline, adain_color_fix, load_tsdsr_lora, tiled_upscale, wavelet_color_fix)
from .realesrgan import (NcnnError, RRDBNet, RealESRGANPipeline, SRVGGNetCompact, from_ncnn, load_upscaler, read_ncnn,
                         upscaler_folder)
from .tinysr import (BlockGates, DepthSearchConfig, TinySRConfig, compress_tinysr, drop_text_stream, keep_blocks,
                     precache, prune_student, prune_vae_channels, remove_attention, replace_with_sepconv, search_depth,
                     to_sepconv_vae)

__all__ = ["BlockGates", "DepthSearchConfig", "NcnnError", "OneStepSRPipeline", "OneStepSRTransformer2DModel",
           "RRDBNet", "RealESRGANPipeline", "SRVGGNetCompact", "SepConv2d", "SepConvAutoencoderKL", "TSDSRError", "TSDSRPipeline", "TinySRConfig",
           "adain_color_fix", "compress_tinysr", "drop_text_stream", "from_ncnn", "keep_blocks", "load_tsdsr_lora", "load_upscaler", "precache",
           "prune_student", "prune_vae_channels", "read_ncnn", "remove_attention", "replace_with_sepconv",
           "search_depth", "tiled_upscale", "to_sepconv_vae", "upscaler_folder", "wavelet_color_fix"]
