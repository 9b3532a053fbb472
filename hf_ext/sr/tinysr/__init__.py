"""TinySR (https://arxiv.org/abs/2508.17434): compress a one-step SR teacher pipeline into a small student.

- ``compress.py``: ``compress_tinysr`` (search, prune, distil, pre-cache), ``prune_student``, ``TinySRConfig``,
  ``continue_distillation``. Start here.
- ``depth_search.py``: which transformer blocks to keep (``BlockGates``, ``search_depth``).
- ``surgery.py``: transformer surgery (``precache``, ``keep_blocks``, ``drop_text_stream``) and ``rebuild``,
  the one helper every surgery, the VAE ones too, makes its new model with.
- ``vae_channel_pruning.py``: ``prune_vae_channels``, importance-ranked channels per channel space.
- ``vae_compression.py``: ``remove_attention`` and SepConv (``to_sepconv_vae``, ``replace_with_sepconv``).
- ``ops.py``: the SepConv factorization math; ``distillation.py``: ``distill``, the student's training loop.

Example:
    >>> from hf_ext.sr.tinysr import TinySRConfig, compress_tinysr
    >>> student, log = compress_tinysr(teacher, TinySRConfig(keep_blocks=4, vae_width=16))   # doctest: +SKIP
"""
from .compress import TinySRConfig, compress_tinysr, continue_distillation, prune_student
from .depth_search import BlockGates, DepthSearchConfig, search_depth
from .distillation import distill
from .surgery import drop_text_stream, keep_blocks, precache, rebuild
from .vae_channel_pruning import prune_vae_channels
from .vae_compression import remove_attention, replace_with_sepconv, to_sepconv_vae

__all__ = ["BlockGates", "DepthSearchConfig", "TinySRConfig", "compress_tinysr", "continue_distillation", "distill",
           "drop_text_stream", "keep_blocks", "precache", "prune_student", "prune_vae_channels", "rebuild",
           "remove_attention", "replace_with_sepconv", "search_depth", "to_sepconv_vae"]
