"""One-step SR transformer (TSD-SR / TinySR style): SD3 joint blocks map an LR latent to a velocity.

Papers: TinySR (https://arxiv.org/abs/2508.17434) compresses TSD-SR (https://arxiv.org/abs/2411.18263), a
one-step SR model distilled from SD3: the bicubic-upsampled LR image's latent z_lr is treated as the noisy
latent of one fixed timestep, and z_hr = z_lr - sigma * v(z_lr) (``sigma``, the timestep over 1000). This module is
that transformer, self-contained (it ships as remote code beside saved pipelines): its fixed "prompt"
(``prompt_embeds``, ``pooled_projections``, learned, since no text encoder is needed at inference) and
``timestep`` are part of it.

It holds the model classes only; the surgery that makes TinySR's layouts from a trained model (``precache``,
``keep_blocks``, ``drop_text_stream``) is in ``hf_ext.sr.tinysr.surgery``. The layouts:
- **Pre-cached** (``precached=True``): the time embedding, the prompt embedding, every block's AdaLN-Zero
  modulation (the official TinySR code caches these too) and the final AdaLN modulation depend only on
  the fixed timestep and prompt, so they are stored as buffers (``CachedOutput``) instead of the linears
  that made them. The output is bit-identical (tested): both paths compute them on one row.
- **Depth masks**: x_{i+1} = m_i * block_i(x_i) + (1 - m_i) * x_i on both streams. ``block_mask`` (a buffer,
  all ones) or a per-call mask (the differentiable search in ``hf_ext.sr.tinysr.depth_search``).
- **Without the text stream** (``text_stream=False``): TinySR's ``TinySD3Transformer2DModel`` drops the prompt
  tokens and their weights; each block is then an ``ImageStreamBlock`` (the image half of SD3's joint block:
  self-attention over the image tokens) and the pooled embedding reaches the blocks only through the AdaLN
  modulation. This changes the function (the image no longer attends to the prompt), so the student is
  distilled afterwards.

Example:
    >>> model = OneStepSRTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=16)
    >>> model(torch.randn(1, 4, 8, 8)).shape
    torch.Size([1, 4, 8, 8])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward, JointTransformerBlock
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.normalization import AdaLayerNormZero
from torch import nn


class CachedOutput(nn.Module):
    """Stands in for a linear whose input never changes: returns its stored output (1, width)."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("value", torch.zeros(1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


class ImageStreamBlock(nn.Module):
    """The image half of diffusers' ``JointTransformerBlock`` (same submodule names, so its weights load as they
    are): AdaLN-Zero, self-attention over the image tokens only, and the gated MLP."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.attn = Attention(query_dim=dim, dim_head=attention_head_dim, heads=num_attention_heads, out_dim=dim,
                              bias=True, processor=JointAttnProcessor2_0(), eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:    # (B, N, D), (1, D)
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        hidden_states = hidden_states + gate_msa[:, None] * self.attn(x)
        x = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return hidden_states + gate_mlp[:, None] * self.ff(x)


class OneStepSRTransformer2DModel(ModelMixin, ConfigMixin):
    """MMDiT over the LR latent (B, C, h, w) -> velocity (B, C, h, w), with a fixed learned prompt."""

    @register_to_config
    def __init__(self, in_channels: int = 4, patch_size: int = 1, num_layers: int = 4, num_attention_heads: int = 4,
                 attention_head_dim: int = 32, joint_attention_dim: int = 64, pooled_projection_dim: int = 64,
                 prompt_length: int = 4, pos_embed_max_size: int = 64, timestep: float = 999.0,
                 precached: bool = False, context_pre_only_last: bool = True,
                 trained_upscales: tuple[int, ...] | None = None, text_stream: bool = True):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed(pos_embed_max_size, pos_embed_max_size, patch_size, in_channels, dim,
                                    pos_embed_max_size=pos_embed_max_size)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(dim, num_attention_heads, attention_head_dim,
                                  context_pre_only=context_pre_only_last and i == num_layers - 1)
            if text_stream else ImageStreamBlock(dim, num_attention_heads, attention_head_dim)
            for i in range(num_layers)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * in_channels)
        self.register_buffer("block_mask", torch.ones(num_layers))                    # m_i, 1 = keep
        if precached:                                     # what the fixed prompt and timestep always give
            self.register_buffer("temb", torch.zeros(1, dim))                         # (1, D)
            if text_stream:
                self.register_buffer("context", torch.zeros(1, prompt_length, dim))    # (1, L, D)
            self.register_buffer("out_modulation", torch.zeros(1, 2 * dim))          # (1, 2D): scale, shift
            for block in self.transformer_blocks:                                     # AdaLN(-Zero) modulations
                for norm in (block.norm1, getattr(block, "norm1_context", None)):
                    if norm is not None:
                        norm.linear = CachedOutput(norm.linear.out_features)
        else:
            if text_stream:
                self.prompt_embeds = nn.Parameter(torch.randn(1, prompt_length, joint_attention_dim) * 0.02)
                self.context_embedder = nn.Linear(joint_attention_dim, dim)
            self.pooled_projections = nn.Parameter(torch.zeros(1, pooled_projection_dim))
            self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim)
            self.norm_out_modulation = nn.Linear(dim, 2 * dim)

    @property
    def sigma(self) -> float:
        """The fixed timestep's noise level (flow matching): the one step is z_hr = z_lr - sigma * v(z_lr)."""
        return self.config.timestep / 1000

    def conditioning(self, batch: int):
        """(temb (1, D), context (B, L, D) or None without a text stream, out_modulation (1, 2D)) for the fixed
        prompt and timestep; the modulations broadcast over the batch, so they are computed on one row in either
        path."""
        text = self.config.text_stream
        if self.config.precached:
            temb, ctx, mod = self.temb, self.context if text else None, self.out_modulation
        else:
            t = torch.full((1,), self.config.timestep, device=self.device, dtype=self.dtype)
            temb = self.time_text_embed(t, self.pooled_projections)
            ctx = self.context_embedder(self.prompt_embeds) if text else None
            mod = self.norm_out_modulation(F.silu(temb))
        return temb, None if ctx is None else ctx.expand(batch, -1, -1), mod

    def forward(self, hidden_states: torch.Tensor, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = hidden_states.shape
        p = self.config.patch_size
        temb, ctx, mod = self.conditioning(B)
        x = self.pos_embed(hidden_states)                                              # (B, N, D)
        masks = self.block_mask if block_mask is None else block_mask
        for m, block in zip(masks, self.transformer_blocks):
            if ctx is None:                                                            # no text stream
                x = m * block(x, temb) + (1 - m) * x
                continue
            ctx_new, x_new = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)
            x = m * x_new + (1 - m) * x                                                # m = 1: exactly x_new
            if ctx_new is not None:
                ctx = m * ctx_new + (1 - m) * ctx
        scale, shift = mod.chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])    # (B, N, p*p*C)
        x = x.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, H, W)
