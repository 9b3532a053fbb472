"""Super-resolution: Real-ESRGAN from its real ncnn weights, a one-step diffusion SR pipeline (TSD-SR /
TinySR style) with pre-caching and depth masks, tiled inference and colour fixes.

Example:
    >>> from hf_ext.sr import RealESRGANPipeline, load_upscaler
    >>> pipe = RealESRGANPipeline(load_upscaler("realesrgan-x4plus"))   # doctest: +SKIP
    >>> big = pipe(image, tile=256).images[0]                            # doctest: +SKIP
"""
from .modeling_onestep_sr import OneStepSRTransformer2DModel, keep_blocks, precache
from .ncnn import NcnnError, read_ncnn
from .ops import adain_color_fix, wavelet_color_fix
from .pipeline_onestep_sr import OneStepSRPipeline
from .pipeline_realesrgan import RealESRGANPipeline
from .pruning import BlockGates, DepthSearchConfig, search_depth
from .realesrgan import RRDBNet, SRVGGNetCompact, from_ncnn, load_upscaler, upscaler_folder
from .tiling import tiled_upscale
from .vae import SepConv2d, remove_attention, replace_with_sepconv

__all__ = ["BlockGates", "DepthSearchConfig", "NcnnError", "OneStepSRPipeline", "OneStepSRTransformer2DModel", "RRDBNet", "RealESRGANPipeline",
           "SRVGGNetCompact", "adain_color_fix", "from_ncnn", "keep_blocks", "load_upscaler", "precache",
           "SepConv2d", "read_ncnn", "remove_attention", "replace_with_sepconv", "search_depth", "tiled_upscale", "upscaler_folder", "wavelet_color_fix"]
