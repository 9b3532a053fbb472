"""Super-resolution: Real-ESRGAN from its real ncnn weights, a one-step diffusion SR pipeline (TSD-SR /
TinySR style) with pre-caching and depth masks, tiled inference and colour fixes, and TinySR's compression
(depth search, VAE channel pruning, attention removal, SepConv, distillation); TSD-SR's released weights
(stock SD3 transformer and VAE with its LoRA files) in ``TSDSRPipeline``.

Example:
    >>> from hf_ext.sr import RealESRGANPipeline, load_upscaler
    >>> pipe = RealESRGANPipeline(load_upscaler("realesrgan-x4plus"))   # doctest: +SKIP
    >>> big = pipe(image, tile=256).images[0]                            # doctest: +SKIP
"""
from .modeling_onestep_sr import OneStepSRTransformer2DModel, drop_text_stream, keep_blocks, precache
from .modeling_sepconv_vae import SepConv2d, SepConvAutoencoderKL
from .ncnn import NcnnError, read_ncnn
from .ops import adain_color_fix, wavelet_color_fix
from .pipeline_onestep_sr import OneStepSRPipeline
from .pipeline_realesrgan import RealESRGANPipeline
from .pruning import BlockGates, DepthSearchConfig, search_depth
from .realesrgan import RRDBNet, SRVGGNetCompact, from_ncnn, load_upscaler, upscaler_folder
from .tiling import tiled_upscale
from .tinysr import TinySRConfig, compress_tinysr, prune_student
from .tsdsr import TSDSRError, TSDSRPipeline, load_tsdsr_lora
from .vae import remove_attention, replace_with_sepconv, to_sepconv_vae
from .vae_pruning import prune_vae_channels

__all__ = ["BlockGates", "DepthSearchConfig", "NcnnError", "OneStepSRPipeline", "OneStepSRTransformer2DModel",
           "RRDBNet", "RealESRGANPipeline", "SRVGGNetCompact", "SepConv2d", "SepConvAutoencoderKL", "TSDSRError", "TSDSRPipeline", "TinySRConfig",
           "adain_color_fix", "compress_tinysr", "drop_text_stream", "from_ncnn", "keep_blocks", "load_tsdsr_lora", "load_upscaler", "precache",
           "prune_student", "prune_vae_channels", "read_ncnn", "remove_attention", "replace_with_sepconv",
           "search_depth", "tiled_upscale", "to_sepconv_vae", "upscaler_folder", "wavelet_color_fix"]
