"""Super-resolution: Real-ESRGAN from its real ncnn weights, tiled pipelines.

Example:
    >>> from hf_ext.sr import RealESRGANPipeline, load_upscaler
    >>> pipe = RealESRGANPipeline(load_upscaler("realesrgan-x4plus"))   # doctest: +SKIP
    >>> big = pipe(image, tile=256).images[0]                            # doctest: +SKIP
"""
from .ncnn import NcnnError, read_ncnn
from .pipeline_realesrgan import RealESRGANPipeline
from .realesrgan import RRDBNet, SRVGGNetCompact, from_ncnn, load_upscaler, upscaler_folder
from .tiling import tiled_upscale

__all__ = ["NcnnError", "RRDBNet", "RealESRGANPipeline", "SRVGGNetCompact", "from_ncnn", "load_upscaler",
           "read_ncnn", "tiled_upscale", "upscaler_folder"]
