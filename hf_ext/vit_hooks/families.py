"""Where each hook point lives in the original modules of every supported family (no weight conversion).

A family is recognised from a block's structure, so fine-tuned heads and wrappers (``ViTForImageClassification``,
``BertForSequenceClassification``, ``LlamaForCausalLM``...) work as they are. Per block we record:

- ``attn_branch`` / ``mlp_branch``: the module whose output is what the attention / MLP adds to the residual
  stream (``hook_attn_out`` / ``hook_mlp_out``);
- ``mid``: how ``hook_resid_mid`` is reached. ``"sum"``: pre-norm blocks, mid = resid_pre + attn_out, patched by
  rewriting attn_out as (patched mid - resid_pre). ``"module:<name>"``: post-norm blocks (BERT), mid is
  that module's output. ``"norm2"``: read-only, from the MLP norm's input (timm EVA blocks with layer-scale
  parameters, which have no module to rewrite);
- ``attn``: the attention module, for ``hook_q/k/v/pattern/z`` (``kind`` says how they are reached).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import HfExtError

SUPPORTED = ("timm VisionTransformer / DeiT (vit_*, deit_*) and any timm model with `blocks` of ls1/ls2 blocks",
             "timm EVA (eva*)", "transformers ViTModel", "Dinov2Model", "CLIPVisionModel", "SiglipVisionModel",
             "BERT-like encoders (BertModel, ...)", "Llama-like decoders (Llama, Qwen2, Mistral, SmolLM2, ...)")


class HookError(HfExtError, ValueError):
    """An unsupported model, an unknown hook name, or a hook that cannot be patched."""


@dataclass(frozen=True)
class Family:
    name: str
    kind: str              # "timm" (qkv / attn_drop / norm module hooks) or "hf" (the hooked AttentionInterface)
    attn_branch: str
    mlp_branch: str
    mid: str
    attn: str              # timm: the Attention module; hf: the module that calls the attention interface
    final: tuple[str, ...]  # candidate names of the final norm, relative to the model root


def _has(m: nn.Module, *names: str) -> bool:
    return all(hasattr(m, n) for n in names)


def block_family(block: nn.Module) -> Family | None:
    """The family of one transformer block, or None."""
    if _has(block, "ls1", "ls2", "attn", "mlp", "norm1", "norm2"):
        internal = "timm" if _has(block.attn, "qkv", "attn_drop", "norm", "num_heads") else "none"
        return Family("timm-vit", internal, "ls1", "ls2", "sum", "attn", ("norm",))
    if _has(block, "gamma_1", "attn", "mlp", "norm1", "norm2"):  # timm EVA
        mid = "sum" if block.gamma_1 is None else "norm2"
        return Family("timm-eva", "none", "attn", "mlp", mid, "attn", ("norm",))
    # transformers < 5.2x nests the interface caller (attention.attention); newer releases flatten it
    inner = "attention.attention" if hasattr(getattr(block, "attention", None), "attention") else "attention"
    if _has(block, "attention", "layernorm_before", "layernorm_after", "mlp"):
        return Family("hf-vit", "hf", "attention", "mlp", "sum", inner, ("layernorm",))
    if _has(block, "attention", "layer_scale1", "layer_scale2", "mlp"):
        return Family("hf-dinov2", "hf", "layer_scale1", "layer_scale2", "sum", inner, ("layernorm",))
    if _has(block, "self_attn", "layer_norm1", "layer_norm2", "mlp"):
        return Family("hf-clip-siglip", "hf", "self_attn", "mlp", "sum", "self_attn",
                      ("post_layernorm", "final_layer_norm"))
    if _has(block, "attention", "intermediate", "output") and _has(block.attention, "self", "output"):
        return Family("hf-bert", "hf", "attention.output.dropout", "output.dropout", "module:attention",
                      "attention.self", ())
    if _has(block, "self_attn", "mlp", "input_layernorm", "post_attention_layernorm") and not _has(
            block, "pre_feedforward_layernorm"):
        return Family("hf-llama", "hf", "self_attn", "mlp", "sum", "self_attn", ("norm",))
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList, Family]:
    """The model's list of blocks: ``(dotted path, ModuleList, Family)``. Raises ``HookError`` if none fits."""
    for path, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) and path.rsplit(".", 1)[-1] in ("blocks", "layer", "layers"):
            fam = block_family(m[0])
            if fam is not None:
                return path, m, fam
    raise HookError(f"{type(model).__name__} is not a supported model: no list of known transformer blocks. "
                    "Supported: " + "; ".join(SUPPORTED))


def find_final(model: nn.Module, blocks_path: str, fam: Family) -> tuple[str, nn.Module] | None:
    """The final norm: the first candidate name that exists next to the blocks or above them."""
    parts = blocks_path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent = model.get_submodule(".".join(parts[:depth])) if depth else model
        for name in fam.final:
            m = getattr(parent, name, None)
            if isinstance(m, nn.Module) and not isinstance(m, nn.Identity):
                return ".".join(parts[:depth] + [name]), m
    return None
