"""TinySR's VAE compression, as pure functions from a diffusers ``AutoencoderKL`` to a smaller one.

- ``remove_attention``: drop the self-attention of the encoder's and decoder's mid blocks (the model's
  only attention, and its cost grows with the square of the latent size). The result is an
  ``AutoencoderKL`` with ``mid_block_add_attention=False``, so ``save_pretrained``/``from_pretrained`` work;
  fine-tune it against the original to recover.
- ``replace_with_sepconv``: every dense k x k conv becomes a depthwise-separable ``SepConv2d`` (k*k*in +
  in*out weights instead of k*k*in*out), initialized as the closest factorization of the dense weight.

Example:
    >>> from diffusers import AutoencoderKL
    >>> vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    ...                     up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    >>> remove_attention(vae).config.mid_block_add_attention
    False
"""
from __future__ import annotations

import torch


@torch.no_grad()
def remove_attention(vae):
    """A copy of ``vae`` without mid-block attention; every other weight is kept."""
    from diffusers import AutoencoderKL

    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"remove_attention takes a diffusers AutoencoderKL, not {type(vae).__name__}")
    out = AutoencoderKL.from_config(vae.config, mid_block_add_attention=False).to(vae.device, vae.dtype)
    state = out.state_dict()
    missing = out.load_state_dict({k: v for k, v in vae.state_dict().items() if k in state}, strict=False).missing_keys
    if missing:
        raise RuntimeError(f"weights the attention-free VAE needs but the original lacks: {missing}")
    return out.train(vae.training)


class SepConv2d(torch.nn.Module):
    """Depthwise k x k (one filter per input channel) then pointwise 1 x 1: TinySR's lightweight conv."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.depthwise = torch.nn.Conv2d(cin, cin, kernel_size, stride, padding, groups=cin, bias=False)
        self.pointwise = torch.nn.Conv2d(cin, cout, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: torch.nn.Conv2d) -> "SepConv2d":
        """The SepConv closest to ``conv`` (per-input-channel rank-1 SVD, ``ops.sepconv_factors``)."""
        from .ops import sepconv_factors

        if conv.groups != 1 or conv.dilation != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1] \
                or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"SepConv replaces square, ungrouped, undilated, zero-padded convs; got {conv}")
        sep = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                  bias=conv.bias is not None).to(conv.weight)
        sep.depthwise.weight.copy_(sepconv_factors(conv.weight)[0])
        sep.pointwise.weight.copy_(sepconv_factors(conv.weight)[1])
        if conv.bias is not None:
            sep.pointwise.bias.copy_(conv.bias)
        return sep


def replace_with_sepconv(module: torch.nn.Module, min_kernel: int = 3) -> int:
    """Swap every square ungrouped ``Conv2d`` with kernel >= ``min_kernel`` in ``module`` for its closest
    ``SepConv2d``, in place; returns how many. Fine-tune afterwards (the factorization is approximate)."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Conv2d) and child.groups == 1 and child.kernel_size[0] >= min_kernel:
            setattr(module, name, SepConv2d.from_conv(child))
            n += 1
        else:
            n += replace_with_sepconv(child, min_kernel)
    return n
