"""TinySR's VAE compression, as pure functions from a diffusers ``AutoencoderKL`` to a smaller one.

- ``remove_attention``: drop the self-attention of the encoder's and decoder's mid blocks (the model's
  only attention, and its cost grows with the square of the latent size). The result is an
  ``AutoencoderKL`` with ``mid_block_add_attention=False``, so ``save_pretrained``/``from_pretrained`` work;
  fine-tune it against the original to recover.

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
