"""TinySR's lightweight VAE: a diffusers ``AutoencoderKL`` whose k x k convs are depthwise-separable (SepConv).

TinySR (2025, https://arxiv.org/abs/2508.17434) shrinks the VAE of its one-step SR model by channel pruning,
attention removal and SepConv: a k x k depthwise conv (one filter per input channel) then a 1 x 1 pointwise
mix, k*k*in + in*out weights instead of k*k*in*out. ``SepConvAutoencoderKL`` is that VAE as a loadable class:
its config records ``sepconv_min_kernel`` and the swap happens in ``__init__``, so ``save_pretrained`` /
``from_pretrained`` round-trip it. This file imports only torch and diffusers, so a saved pipeline can ship it
as remote code. Build one from a trained VAE with ``hf_ext.sr.tinysr.vae_compression.to_sepconv_vae``.

Example:
    >>> vae = SepConvAutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    ...                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    >>> type(vae.encoder.conv_in).__name__
    'SepConv2d'
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import register_to_config


class SepConv2d(torch.nn.Module):
    """Depthwise k x k (one filter per input channel) then pointwise 1 x 1: TinySR's lightweight conv."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.depthwise = torch.nn.Conv2d(cin, cin, kernel_size, stride, padding, groups=cin, bias=False)
        self.pointwise = torch.nn.Conv2d(cin, cout, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                     # (B, in, H, W) -> (B, out, H', W')
        return self.pointwise(self.depthwise(x))

    @classmethod
    def like(cls, conv: torch.nn.Conv2d) -> "SepConv2d":
        """An (untrained) SepConv with ``conv``'s shapes, stride and padding."""
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1] \
                or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"SepConv replaces square, ungrouped, undilated, zero-padded convs; got {conv}")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                   bias=conv.bias is not None).to(conv.weight.device, conv.weight.dtype)


def sepconv_targets(module: torch.nn.Module, min_kernel: int = 3) -> list[tuple[torch.nn.Module, str, torch.nn.Conv2d]]:
    """(parent, attribute, conv) for every square ungrouped ``Conv2d`` with kernel >= ``min_kernel``."""
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
            if isinstance(child, torch.nn.Conv2d) and child.groups == 1 and child.kernel_size[0] >= min_kernel]


class SepConvAutoencoderKL(AutoencoderKL):
    """``AutoencoderKL`` with every k x k conv (k >= ``sepconv_min_kernel``) depthwise-separable."""

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",), block_out_channels: tuple[int, ...] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32,
                 sample_size: int = 32, scaling_factor: float = 0.18215, shift_factor: float | None = None,
                 latents_mean: tuple[float, ...] | None = None, latents_std: tuple[float, ...] | None = None,
                 force_upcast: bool = True, use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True, sepconv_min_kernel: int = 3):
        super().__init__(in_channels, out_channels, down_block_types, up_block_types, block_out_channels,
                         layers_per_block, act_fn, latent_channels, norm_num_groups, sample_size, scaling_factor,
                         shift_factor, latents_mean, latents_std, force_upcast, use_quant_conv, use_post_quant_conv,
                         mid_block_add_attention)
        for parent, name, conv in sepconv_targets(self, sepconv_min_kernel):
            setattr(parent, name, SepConv2d.like(conv))
