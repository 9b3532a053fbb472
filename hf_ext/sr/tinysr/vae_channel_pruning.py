"""TinySR's VAE channel pruning: a diffusers ``AutoencoderKL`` -> the same architecture at a smaller width.

Channels are not independent: a ResNet block adds its output to its input, so every layer that writes into
one residual stream must keep the same channels. ``channel_spaces`` walks the VAE in forward order and names
each *channel space* (a residual stream, a ResNet block's inner channels, an attention's query/key and value
channels) with every (parameter, dim) that indexes it. Then, per space:
- **importance**: the L1 norm of each channel's filter in every layer that writes it (Li et al. 2017), each
  layer normalized by its mean, summed over the writers;
- channels under a GroupNorm are kept or dropped as **whole groups** (the group size stays the same), so the
  kept groups' statistics are exact; the most important groups (or, for attention, channels) are kept in order.
Dropping channels that carry nothing (zero writers) is therefore exact (tested). The latent channels, the
image channels and the latent statistics are untouched, so the pruned VAE shares its teacher's latent
space, which is what TinySR's distillation needs.

Example:
    >>> from diffusers import AutoencoderKL
    >>> vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    ...                     up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    >>> prune_vae_channels(vae, width=8).config.block_out_channels
    (8, 16)
"""
from __future__ import annotations

import torch

from .surgery import rebuild

SUPPORTED = "diffusers AutoencoderKL (DownEncoderBlock2D / UpDecoderBlock2D, ResNet blocks, mid-block attention)"


class ChannelSpaces:
    """``uses[param name] = [(dim, space)]``; ``sizes[space]``; ``groups[space]`` (GroupNorm groups, or 0)."""

    def __init__(self):
        self.uses: dict[str, list[tuple[int, int]]] = {}
        self.sizes: list[int] = []
        self.groups: list[int] = []

    def new(self, size: int) -> int:
        self.sizes.append(size)
        self.groups.append(0)
        return len(self.sizes) - 1

    def use(self, name: str, dim: int, space: int | None) -> None:
        if space is not None:
            self.uses.setdefault(name, []).append((dim, space))

    def layer(self, prefix: str, module, out: int | None, inp: int | None) -> None:
        """A conv or linear (weight (out, in, ...), bias (out,)) from space ``inp`` to space ``out``."""
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) or getattr(module, "groups", 1) != 1:
            raise TypeError(f"channel pruning supports dense convs and linears; {prefix} is {module}. Prune "
                            "before replacing convs with SepConv.")
        self.use(f"{prefix}.weight", 0, out)
        self.use(f"{prefix}.weight", 1, inp)
        if module.bias is not None:
            self.use(f"{prefix}.bias", 0, out)

    def norm(self, prefix: str, module, space: int) -> None:
        self.groups[space] = module.num_groups
        self.use(f"{prefix}.weight", 0, space)
        self.use(f"{prefix}.bias", 0, space)

    def resnet(self, prefix: str, r, s_in: int) -> int:
        inner = self.new(r.conv1.out_channels)
        s_out = s_in if r.conv_shortcut is None else self.new(r.conv2.out_channels)
        self.norm(f"{prefix}.norm1", r.norm1, s_in)
        self.layer(f"{prefix}.conv1", r.conv1, inner, s_in)
        self.norm(f"{prefix}.norm2", r.norm2, inner)
        self.layer(f"{prefix}.conv2", r.conv2, s_out, inner)
        if r.conv_shortcut is not None:
            self.layer(f"{prefix}.conv_shortcut", r.conv_shortcut, s_out, s_in)
        return s_out

    def mid(self, prefix: str, block, s: int) -> int:
        s = self.resnet(f"{prefix}.resnets.0", block.resnets[0], s)
        for i, (a, r) in enumerate(zip(block.attentions, block.resnets[1:])):
            if a is not None:
                qk, v = self.new(a.to_q.out_features), self.new(a.to_v.out_features)
                self.norm(f"{prefix}.attentions.{i}.group_norm", a.group_norm, s)
                for name, out in (("to_q", qk), ("to_k", qk), ("to_v", v)):
                    self.layer(f"{prefix}.attentions.{i}.{name}", getattr(a, name), out, s)
                self.layer(f"{prefix}.attentions.{i}.to_out.0", a.to_out[0], s, v)
            s = self.resnet(f"{prefix}.resnets.{i + 1}", r, s)
        return s

    def stages(self, prefix: str, blocks, kind: str, s: int) -> int:
        for i, block in enumerate(blocks):
            for j, r in enumerate(block.resnets):
                s = self.resnet(f"{prefix}.{i}.resnets.{j}", r, s)
            for j, sampler in enumerate(getattr(block, kind) or []):
                s2 = self.new(sampler.conv.out_channels)
                self.layer(f"{prefix}.{i}.{kind}.{j}.conv", sampler.conv, s2, s)
                s = s2
        return s


def channel_spaces(vae) -> ChannelSpaces:
    """The channel spaces of ``vae``, walked in forward order (so two VAEs of one layout number them alike)."""
    sp = ChannelSpaces()
    try:
        enc, dec = vae.encoder, vae.decoder
        s = sp.new(enc.conv_in.out_channels)
        sp.layer("encoder.conv_in", enc.conv_in, s, None)
        s = sp.stages("encoder.down_blocks", enc.down_blocks, "downsamplers", s)
        s = sp.mid("encoder.mid_block", enc.mid_block, s)
        sp.norm("encoder.conv_norm_out", enc.conv_norm_out, s)
        sp.layer("encoder.conv_out", enc.conv_out, None, s)
        s = sp.new(dec.conv_in.out_channels)
        sp.layer("decoder.conv_in", dec.conv_in, s, None)
        s = sp.mid("decoder.mid_block", dec.mid_block, s)
        s = sp.stages("decoder.up_blocks", dec.up_blocks, "upsamplers", s)
        sp.norm("decoder.conv_norm_out", dec.conv_norm_out, s)
        sp.layer("decoder.conv_out", dec.conv_out, None, s)
    except AttributeError as e:
        raise TypeError(f"channel pruning supports a {SUPPORTED}; this model differs ({e})") from None
    return sp


def channel_importance(vae, spaces: ChannelSpaces) -> list[torch.Tensor]:
    """Per space, (size,) scores: each writer layer's per-channel filter L1 norm over its mean, summed."""
    params = dict(vae.named_parameters())
    scores = [torch.zeros(n, dtype=torch.float64) for n in spaces.sizes]
    for name, uses in spaces.uses.items():
        w = params[name].detach().double()
        for dim, space in uses:
            if dim == 0 and w.dim() >= 2:                                  # a layer writing this space
                norms = w.abs().flatten(1).sum(1)                          # (out,)
                scores[space] += norms / norms.mean().clamp_min(1e-30)
    return scores


def _keep(score: torch.Tensor, n_keep: int, groups: int) -> torch.Tensor:
    """Indices (ascending) of the ``n_keep`` channels kept: whole groups if ``groups``, else single channels."""
    if not groups:
        return score.topk(n_keep).indices.sort().values
    size = len(score) // groups
    if n_keep % size:
        raise ValueError(f"keeping {n_keep} of {len(score)} channels would split a GroupNorm group of {size}")
    best = score.view(groups, size).sum(1).topk(n_keep // size).indices.sort().values
    return (best[:, None] * size + torch.arange(size)).flatten()


@torch.no_grad()
def prune_vae_channels(vae, width: int):
    """A copy of ``vae`` with ``block_out_channels`` scaled so the first is ``width`` (GroupNorm groups scaled
    alike), keeping the most important channels of every channel space."""
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import Attention

    if not isinstance(vae, AutoencoderKL) or type(vae) is not AutoencoderKL:
        raise TypeError(f"prune_vae_channels takes a dense {SUPPORTED}, not {type(vae).__name__}; prune before "
                        "converting to SepConv")
    c0, groups = vae.config.block_out_channels[0], vae.config.norm_num_groups
    widths = [c * width / c0 for c in vae.config.block_out_channels]
    if not 0 < width <= c0 or any(w != int(w) for w in widths) or (groups * width) % c0:
        raise ValueError(f"width={width}: give a first-block width in (0, {c0}] that scales every block width "
                         f"{tuple(vae.config.block_out_channels)} and the {groups} GroupNorm groups to whole numbers")
    student = rebuild(vae, weights=False, block_out_channels=tuple(int(w) for w in widths),
                      norm_num_groups=groups * width // c0)                # filled below, from the kept channels
    big, small = channel_spaces(vae), channel_spaces(student)
    scores = channel_importance(vae, big)
    keep = [_keep(s, n, g).to(vae.device) for s, n, g in zip(scores, small.sizes, big.groups)]
    state = {}
    for name, t in vae.state_dict().items():
        for dim, space in big.uses.get(name, []):
            t = t.index_select(dim, keep[space])
        state[name] = t
    teacher_modules = dict(vae.named_modules())
    for name, a in student.named_modules():                       # keep q.k / sqrt(d) as it was with fewer dims
        if isinstance(a, Attention):
            ratio = teacher_modules[name].scale / a.scale
            state[f"{name}.to_q.weight"] = state[f"{name}.to_q.weight"] * ratio
            if a.to_q.bias is not None:
                state[f"{name}.to_q.bias"] = state[f"{name}.to_q.bias"] * ratio
    student.load_state_dict(state)                                 # (in vae's dtype: float64 keeps its bits)
    return student
