"""Pure math of TFMQ's post-training quantization (simulated): weights per output channel, activations per tensor.

Paper: TFMQ-DM, https://arxiv.org/abs/2311.16503. Weights: symmetric, one scale per output channel,
``bits`` in {4, 8}. Activations: asymmetric 8-bit over a calibrated range [lo, hi] per tensor, where the
range is either one for all steps (naive min/max) or one per sampler step (finite-set calibration).
Quantize-dequantize ("fake" quantization) runs in float32: it measures accuracy, not speed (the real int8
kernels are torchao's; see ``quant.py``). The integer math is torchao's ``quantize_affine`` /
``dequantize_affine``; ``*_naive`` are elementwise references.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def weight_qparams(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scales (out, 1) of ``w`` (out, in)."""
    qmax = 2 ** (bits - 1) - 1
    return (w.detach().abs().amax(1, keepdim=True) / qmax).clamp_min(1e-12).float()


def fake_quant_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized weight, integer codes int8, scales (out, 1)) for symmetric per-channel ``bits``-bit."""
    from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine

    scale = weight_qparams(w, bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    block = (1, w.shape[1])                                                    # one scale per output row
    zero = torch.zeros(w.shape[0], dtype=torch.int32)
    q = quantize_affine(w.float(), block, scale.view(-1), zero, torch.int8, qmin, qmax)
    return dequantize_affine(q, block, scale.view(-1), zero, torch.int8, qmin, qmax), q, scale


def dequant_weight(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Weights back from integer codes (out, in) and per-channel scales (out, 1), as ``fake_quant_weight``."""
    from torchao.quantization.quant_primitives import dequantize_affine

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    zero = torch.zeros(q.shape[0], dtype=torch.int32)
    return dequantize_affine(q, (1, q.shape[1]), scale.view(-1), zero, torch.int8, qmin, qmax)


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, zero point) covering [min(lo, 0), max(hi, 0)] with 2**bits levels."""
    lo, hi = torch.minimum(lo.float(), torch.zeros(())), torch.maximum(hi.float(), torch.zeros(()))
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
    return scale, torch.round(-lo / scale).to(torch.int32)


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize-dequantize ``x`` (any shape) per tensor with an asymmetric unsigned ``bits``-bit grid."""
    from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine

    block = tuple(x.shape)
    q = quantize_affine(x, block, scale.reshape(1), zero_point.reshape(1), torch.uint8, 0, 2 ** bits - 1)
    return dequantize_affine(q, block, scale.reshape(1), zero_point.reshape(1), torch.uint8, 0, 2 ** bits - 1,
                             output_dtype=x.dtype)


def fake_quant_weight_naive(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        s = max(float(w[i].abs().max()) / qmax, 1e-12)
        out[i] = torch.tensor([min(max(round(float(v) / s), -qmax - 1), qmax) * s for v in w[i]], dtype=torch.float64)
    return out.float()


def fake_quant_act_naive(x: torch.Tensor, lo: float, hi: float, bits: int = 8) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = max((hi - lo) / (2 ** bits - 1), 1e-12)
    z = round(-lo / s)
    vals = [(min(max(round(float(v) / s) + z, 0), 2 ** bits - 1) - z) * s for v in x.flatten()]
    return torch.tensor(vals, dtype=torch.float64).view(x.shape).float()
