"""A TFMQ quantization on disk, next to the model: ``tfmq_quant.safetensors`` (+ ``temporal_cache.safetensors``).

``tfmq_quant.safetensors`` holds, per quantized linear, ``<layer>.qweight`` (int8 codes, int4 values in
[-8, 7] for W4), ``<layer>.wscale`` (out, 1) and ``<layer>.act_range`` (steps or 1, 2); its metadata holds
the ``TFMQConfig``, the calibrated time steps and the temporal modules served from the table, which is
saved beside it.

Example:
    >>> from hf_ext.temporal.io import load_tfmq_model
    >>> transformer, config = load_tfmq_model("dit-tfmq/")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from .cache import TemporalFeatureCache, apply_temporal_cache
from .tib import TemporalError

QUANT_FILE = "tfmq_quant.safetensors"


def save_tfmq(folder: str | os.PathLike, model) -> Path:
    """Write the TFMQ state of ``model`` (after ``quantize_tfmq``) into ``folder``."""
    from safetensors.torch import save_file

    state = getattr(model, "_hf_ext_tfmq", None)
    if state is None:
        raise TemporalError("this model has no TFMQ quantization to save; run quantize_tfmq(model, ...) first")
    tensors = {"timesteps": state["timesteps"].contiguous()}
    for name, r in state["ranges"].items():
        q, scale = state["qweights"][name]
        tensors.update({f"{name}.qweight": q.contiguous(), f"{name}.wscale": scale.contiguous(),
                        f"{name}.act_range": r.contiguous()})
    meta = {"config": asdict(state["config"]), "cached": state["cached"]}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state["cached"]:
        model._hf_ext_temporal.save(folder)
    tmp = folder / f".{QUANT_FILE}.tmp"
    save_file(tensors, tmp, metadata={"hf_ext_tfmq": json.dumps(meta), "format": "pt"})
    os.replace(tmp, folder / QUANT_FILE)
    return folder / QUANT_FILE


def apply_saved_tfmq(model, folder: str | os.PathLike):
    """Apply the quantization saved in ``folder`` to ``model`` (the same architecture); returns the config."""
    from safetensors import safe_open

    from .quant import TFMQConfig, attach_quantizers

    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        raise TemporalError(f"{folder} has no {QUANT_FILE}; create it with `hf-ext convert tfmq --model ... --out DIR`")
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("hf_ext_tfmq", "null") or "null")
        if meta is None:
            raise TemporalError(f"{path} has no TFMQ metadata; it was not written by hf-ext: re-quantize")
        names = sorted({k.rsplit(".", 1)[0] for k in f.keys() if k.endswith(".qweight")})
        mods = dict(model.named_modules())
        for n in names:
            w = getattr(mods.get(n), "weight", None)
            if w is None or tuple(w.shape) != tuple(f.get_slice(f"{n}.qweight").get_shape()):
                raise TemporalError(f"the saved quantization of '{n}' does not fit this model; it was made for another "
                                    "model: re-quantize")
        qweights = {n: (f.get_tensor(f"{n}.qweight"), f.get_tensor(f"{n}.wscale")) for n in names}
        ranges = {n: f.get_tensor(f"{n}.act_range") for n in names}
        timesteps = f.get_tensor("timesteps")
    config = TFMQConfig(**meta["config"])
    if meta["cached"]:
        apply_temporal_cache(model, cache=TemporalFeatureCache.load(folder), modules=meta["cached"])
    attach_quantizers(model, config, ranges, timesteps, qweights)
    model._hf_ext_tfmq = {"config": config, "ranges": ranges, "qweights": qweights, "cached": meta["cached"],
                          "disturbance": {}, "timesteps": timesteps}
    return config


def load_tfmq_model(folder: str | os.PathLike, dtype=torch.float32):
    """The diffusers model saved in ``folder`` with its TFMQ quantization applied: ``(model, config)``."""
    from ..hub import load_diffusers_folder

    model = load_diffusers_folder(folder, dtype)
    return model, apply_saved_tfmq(model, folder)
