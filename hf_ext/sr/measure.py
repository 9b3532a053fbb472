"""What a compression of a one-step SR pipeline costs and keeps: parameters, multiply-accumulates, Y-PSNR.

Shared by ``hf-ext convert tinysr`` and ``benchmarks/sr.py``, so that the model card and the benchmark count
the same things the same way.

Example:
    >>> report = compression_report(teacher, student)          # doctest: +SKIP
    >>> report["params_saved"], report["psnr_drop_x4"]         # doctest: +SKIP
"""
from __future__ import annotations

import torch

from ..macs import count_macs
from .data import eval_psnr


def pipeline_params(pipe) -> int:
    """Parameters of a ``OneStepSRPipeline``'s VAE and transformer."""
    return sum(p.numel() for m in (pipe.vae, pipe.transformer) for p in m.parameters())


@torch.no_grad()
def pipeline_macs(pipe, side: int = 64, upscale: int = 4, tile: int = 64):
    """The multiply-accumulates of one x``upscale`` call on a ``side`` x ``side`` LR image (``count_macs``'s
    counter: ``.total`` and ``.by_op``); they do not depend on the pixel values."""
    lr = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    pipe.set_progress_bar_config(disable=True)
    with count_macs() as macs:
        pipe(lr, upscale=upscale, tile=tile, output_type="pt")
    return macs


def compression_report(teacher, student) -> dict:
    """Parameters, GMACs of a 64 px -> 256 px call and eval-photo Y-PSNR at x4 for both pipelines, and the
    share of parameters saved and the PSNR lost."""
    out = {}
    for name, pipe in (("teacher", teacher), ("student", student)):
        pipe.set_progress_bar_config(disable=True)
        out[f"{name}_params"] = pipeline_params(pipe)
        out[f"{name}_gmacs_256px"] = pipeline_macs(pipe).total / 1e9
        out[f"{name}_psnr_y_x4"] = eval_psnr(pipe, 4)
    out["params_saved"] = 1 - out["student_params"] / out["teacher_params"]
    out["psnr_drop_x4"] = out["teacher_psnr_y_x4"] - out["student_psnr_y_x4"]
    return out
