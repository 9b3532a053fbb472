"""The Temporal Information Block (TIB) of a diffusers denoiser: the modules whose outputs depend only on t.

Paper: TFMQ-DM, "Temporal Feature Maintenance Quantization for Diffusion Models" (Huang et al., CVPR 2024),
https://arxiv.org/abs/2311.16503. The TIB is everything between the time step and the per-block
modulation: the sinusoidal projection, the time-embedding MLP and every block's time projection.

``find_tib(model)`` names, per family, the outermost temporal modules; ``tib_outputs(model, tib, t, y)``
computes their outputs for a batch of time steps (and class labels, for class-conditional DiT, whose adaLN
embedding adds a label embedding to the time embedding) with exactly the calls the model's forward makes.

| family | temporal modules (outputs cached) |
|---|---|
| DiT (``ada_norm_zero``) | every block's ``norm1.emb`` (t, y -> D) and ``norm1.linear`` (-> 6D shift/scale/gate), ``proj_out_1`` |
| PixArt (``ada_norm_single``) | ``adaln_single`` (t -> 6D modulation, D embedded time step) |
| UNet2DModel / UNet2DConditionModel | ``time_proj``, ``time_embedding`` and every resnet's ``time_emb_proj`` |
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import HfExtError


class TemporalError(HfExtError, ValueError):
    """A model without a recognisable time-embedding path, a table for another schedule, a bad bit width."""


@dataclass
class TIB:
    family: str                                   # "dit" | "pixart" | "unet"
    modules: list[str]                            # outermost temporal modules, their outputs are cached
    num_labels: int = 0                           # DiT: classes + 1 (the CFG null label); else 0 (t only)
    time_emb_projs: list[str] = field(default_factory=list)   # UNet resnets


def find_tib(model: torch.nn.Module) -> TIB:
    """The temporal modules of ``model``, or a ``TemporalError`` naming what was looked for."""
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if name == "DiTTransformer2DModel" or (hasattr(model, "proj_out_1") and getattr(cfg, "norm_type", "") == "ada_norm_zero"):
        blocks = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
        mods = [m for b in blocks for m in (f"{b}.norm1.emb", f"{b}.norm1.linear")] + ["proj_out_1"]
        return TIB("dit", mods, num_labels=cfg.num_embeds_ada_norm + 1)
    if hasattr(model, "adaln_single"):
        if getattr(model.adaln_single.emb, "use_additional_conditions", False):
            raise TemporalError(f"{name}'s adaln_single also embeds resolution and aspect ratio, so its features "
                                "are not a function of t alone; the temporal cache supports PixArt without "
                                "additional conditions")
        return TIB("pixart", ["adaln_single"])
    if hasattr(model, "time_proj") and hasattr(model, "time_embedding"):
        extra = [a for a in ("class_embedding", "add_embedding") if getattr(model, a, None) is not None]
        if getattr(model.time_embedding, "cond_proj", None) is not None:
            extra.append("time_embedding.cond_proj (timestep_cond)")
        if extra:
            raise TemporalError(f"{name} adds {extra[0]} to its time embedding, so the embedding is not a function of t "
                                "alone; the temporal cache supports UNets without class or added embeddings")
        projs = [n for n, m in model.named_modules() if n.endswith("time_emb_proj") and isinstance(m, torch.nn.Linear)]
        return TIB("unet", ["time_proj", "time_embedding", *projs], time_emb_projs=projs)
    raise TemporalError(f"{name} has no recognisable time-embedding path: looked for DiT adaLN-Zero blocks "
                        "(transformer_blocks.*.norm1.emb + proj_out_1), PixArt's adaln_single, and a UNet's "
                        "time_proj + time_embedding")


@torch.no_grad()
def tib_outputs(model, tib: TIB, t: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """``{module name: output}`` of every temporal module for time steps ``t`` (M,) (and ``labels`` (M,) for DiT),
    computed with the same calls as the model's forward. PixArt's output is a tuple of two tensors."""
    dtype = next(model.parameters()).dtype
    mods = dict(model.named_modules())
    out = {}
    if tib.family == "dit":
        for b in range(len(model.transformer_blocks)):
            norm1 = model.transformer_blocks[b].norm1
            emb = norm1.emb(t, labels, hidden_dtype=dtype)                         # (M, D)
            out[f"transformer_blocks.{b}.norm1.emb"] = emb
            out[f"transformer_blocks.{b}.norm1.linear"] = norm1.linear(norm1.silu(emb))  # (M, 6D)
        first = out["transformer_blocks.0.norm1.emb"]
        out["proj_out_1"] = model.proj_out_1(F.silu(first))                       # (M, 2D)
    elif tib.family == "pixart":
        out["adaln_single"] = model.adaln_single(t, None, batch_size=len(t), hidden_dtype=dtype)  # (M, 6D), (M, D)
    else:
        t_emb = model.time_proj(t)                                                 # (M, C0)
        out["time_proj"] = t_emb
        emb = model.time_embedding(t_emb.to(dtype=dtype))                          # (M, 4 C0)
        out["time_embedding"] = emb
        act = getattr(model, "time_embed_act", None)
        temb = act(emb) if act is not None else emb
        for name in tib.time_emb_projs:
            resnet = mods[name.rsplit(".", 1)[0]]
            x = temb if getattr(resnet, "skip_time_act", False) else resnet.nonlinearity(temb)
            out[name] = resnet.time_emb_proj(x)                                    # (M, C or 2C)
    return out
