"""``load_hookable``: load a model to hook, with its modality, tokenizer and image normalisation (``Hookable``),
from a CLI-style spec: ``timm:<name>`` (random init), a zoo name, a folder or a Hub id."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .families import HookError


@dataclass
class Hookable:
    model: torch.nn.Module
    modality: str                 # "image" or "text"
    tokenizer: object | None = None
    image_size: int = 224
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    name: str = ""


def load_hookable(spec: str, seed: int = 0) -> Hookable:
    """``timm:vit_tiny_patch16_224`` builds a timm model with random weights (seeded; no ViT weights can be had
    offline); anything else loads with transformers (vision towers of CLIP/SigLIP checkpoints are used)."""
    if spec.startswith("timm:"):
        import timm

        torch.manual_seed(seed)
        try:
            model = timm.create_model(spec[5:], pretrained=False).eval()
        except RuntimeError as e:
            raise HookError(f"timm has no model '{spec[5:]}' ({e}); see timm.list_models('vit_*')") from e
        cfg = model.pretrained_cfg
        return Hookable(model, "image", None, cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]),
                        f"{spec} (random init, seed {seed})")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ..zoo import HUB_IDS, resolve_model

    path = resolve_model(spec)
    config = AutoConfig.from_pretrained(path)
    name = HUB_IDS.get(spec, spec)
    vision = getattr(config, "vision_config", None) or (config if hasattr(config, "image_size") else None)
    if vision is not None:
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        model = getattr(model, "vision_model", model)
        return Hookable(model, "image", None, vision.image_size, name=name)
    tok = AutoTokenizer.from_pretrained(path)
    if getattr(config, "is_decoder", False) or config.architectures and any("CausalLM" in a for a in config.architectures):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return Hookable(model, "text", tok, name=name)
