"""Calibration factors on disk: ``icc_factors.safetensors`` next to the model, with the ICC config in its metadata.

The file holds ``<layer>.A`` (out, r) and ``<layer>.B`` (r, in) for every cached layer; metadata holds the
``ICCConfig`` as JSON, so ``load_factors`` gives back exactly what ``apply_icc_cache`` needs.

Example:
    >>> from hf_ext.dit_cache.io import save_factors, load_factors
    >>> save_factors("dit-icc/", factors, config)  # doctest: +SKIP
    >>> factors, config = load_factors("dit-icc/")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from .config import ICCConfig, ICCError

FACTORS_FILE = "icc_factors.safetensors"


def save_factors(folder: str | os.PathLike, factors: dict, config: ICCConfig) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / FACTORS_FILE
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = A.contiguous().float(), B.contiguous().float()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"icc_config": json.dumps(asdict(config)), "format": "pt"})
    os.replace(tmp, path)
    return path


def load_factors(folder: str | os.PathLike) -> tuple[dict, ICCConfig]:
    from safetensors import safe_open

    path = Path(folder) / FACTORS_FILE
    if not path.is_file():
        raise ICCError(f"{folder} has no {FACTORS_FILE}; create it with `hf-ext convert icc --model ... --out DIR`")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if "icc_config" not in meta:
            raise ICCError(f"{path} has no ICC config in its metadata; it was not written by hf-ext: recalibrate")
        config = ICCConfig(**json.loads(meta["icc_config"]))
        names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        factors = {n: (f.get_tensor(f"{n}.A"), f.get_tensor(f"{n}.B")) for n in names}
    return factors, config


def load_icc_transformer(folder: str | os.PathLike, dtype=torch.float32):
    """The transformer saved in ``folder`` with its ICC factors applied: ``(transformer, config)``."""
    from ..hub import load_diffusers_folder
    from .hooks import apply_icc_cache

    transformer = load_diffusers_folder(folder, dtype)
    factors, config = load_factors(folder)
    apply_icc_cache(transformer, config, factors)
    return transformer, config
