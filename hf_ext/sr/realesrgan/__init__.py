"""Real-ESRGAN (https://arxiv.org/abs/2107.10833) from its real ncnn weights, as diffusers models and a pipeline.

- ``modeling_realesrgan.py``: the ``RRDBNet`` and ``SRVGGNetCompact`` generators, ``from_ncnn`` and
  ``load_upscaler`` (zoo name or saved folder).
- ``ncnn.py``: the reader of ncnn ``.param`` / ``.bin`` files.
- ``pipeline_realesrgan.py``: ``RealESRGANPipeline``, tiled and blended.
Saved pipelines name their upscaler's module; the classes are exported here too, so a folder that names
``hf_ext.sr.realesrgan`` loads.

Example:
    >>> from hf_ext.sr.realesrgan import RealESRGANPipeline, load_upscaler
    >>> pipe = RealESRGANPipeline(load_upscaler("realesrgan-x4plus"))   # doctest: +SKIP
"""
from .modeling_realesrgan import RRDBNet, SRVGGNetCompact, from_ncnn, load_upscaler, upscaler_folder
from .ncnn import NcnnError, read_ncnn
from .pipeline_realesrgan import RealESRGANPipeline

__all__ = ["NcnnError", "RRDBNet", "RealESRGANPipeline", "SRVGGNetCompact", "from_ncnn", "load_upscaler", "read_ncnn",
           "upscaler_folder"]
