"""TinySR's VAE compression, as pure functions from a diffusers ``AutoencoderKL`` to a smaller one.

- ``remove_attention``: drop the self-attention of the encoder's and decoder's mid blocks (the model's
  only attention, and its cost grows with the square of the latent size). The result has
  ``mid_block_add_attention=False``, so ``save_pretrained``/``from_pretrained`` work.
- ``to_sepconv_vae``: every dense k x k conv becomes a depthwise-separable ``SepConv2d`` (k*k*in + in*out
  weights instead of k*k*in*out), initialized as the closest factorization of the dense weight; the result
  is a loadable ``SepConvAutoencoderKL``. ``replace_with_sepconv`` does the same in place on any module.
- Channel pruning by importance is ``vae_channel_pruning.prune_vae_channels``.
Each is approximate (except where noted in the tests), so distil or fine-tune afterwards.

Example:
    >>> from diffusers import AutoencoderKL
    >>> vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    ...                     up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    >>> remove_attention(vae).config.mid_block_add_attention
    False
    >>> type(to_sepconv_vae(vae).decoder.conv_out).__name__
    'SepConv2d'
"""
from __future__ import annotations

import torch

from ..onestep.modeling_sepconv_vae import SepConv2d, SepConvAutoencoderKL, sepconv_targets
from .ops import sepconv_factors
from .surgery import rebuild


def _check_vae(vae, what: str) -> None:
    from diffusers import AutoencoderKL

    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"{what} takes a diffusers AutoencoderKL, not {type(vae).__name__}")


@torch.no_grad()
def remove_attention(vae):
    """A copy of ``vae`` without mid-block attention; every other weight is kept."""
    _check_vae(vae, "remove_attention")
    return rebuild(vae, mid_block_add_attention=False)


@torch.no_grad()
def sepconv_from_conv(conv: torch.nn.Conv2d) -> SepConv2d:
    """The SepConv closest to ``conv`` (per-input-channel rank-1 SVD, ``tinysr/ops.py``'s ``sepconv_factors``)."""
    sep = SepConv2d.like(conv)
    depthwise, pointwise = sepconv_factors(conv.weight)
    sep.depthwise.weight.copy_(depthwise)
    sep.pointwise.weight.copy_(pointwise)
    if conv.bias is not None:
        sep.pointwise.bias.copy_(conv.bias)
    return sep


def replace_with_sepconv(module: torch.nn.Module, min_kernel: int = 3) -> int:
    """Swap every square ungrouped ``Conv2d`` with kernel >= ``min_kernel`` in ``module`` for its closest
    ``SepConv2d``, in place; returns how many."""
    targets = sepconv_targets(module, min_kernel)
    for parent, name, conv in targets:
        setattr(parent, name, sepconv_from_conv(conv))
    return len(targets)


@torch.no_grad()
def to_sepconv_vae(vae, min_kernel: int = 3) -> SepConvAutoencoderKL:
    """A ``SepConvAutoencoderKL`` whose SepConvs are the closest factorizations of ``vae``'s k x k convs."""
    _check_vae(vae, "to_sepconv_vae")
    if isinstance(vae, SepConvAutoencoderKL):
        raise ValueError("this VAE is already a SepConvAutoencoderKL")
    dense = rebuild(vae)                                               # a copy, so ``vae`` stays untouched
    replace_with_sepconv(dense, min_kernel)
    return rebuild(dense, SepConvAutoencoderKL, sepconv_min_kernel=min_kernel)
