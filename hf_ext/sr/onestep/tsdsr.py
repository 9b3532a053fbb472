"""TSD-SR's released layout, run as it ships: a stock SD3 transformer and VAE, rank-64 LoRAs, fixed prompt embeddings.

Paper: TSD-SR, https://arxiv.org/abs/2411.18263 (one-step SR distilled from SD3-medium). A holder of its files has

    base/            stabilityai/stable-diffusion-3-medium-diffusers (transformer/, vae/)
    lora/            transformer.safetensors, vae.safetensors (TSD-SR's checkpoint/tsdsr or tsdsr-mse)
    embeds/          prompt_embeds.pt (1, 333, 4096), pool_embeds.pt (1, 2048) (TSD-SR's dataset/default)

and ``TSDSRPipeline.from_tsdsr("base", "lora", "embeds")`` upscales with them. The LoRA files were written by
peft's ``get_peft_model_state_dict`` and diffusers' ``save_lora_weights(transformer_lora_layers=...)``, so every
key, the VAE's too, reads ``transformer.<module>.lora_{A,B}.weight`` (no adapter name, no alpha: scale 1). They
are attached through peft (``add_adapter`` + ``set_peft_model_state_dict``), not copied by hand.

The math is the official test script's (test/test_tsdsr.py):
1. the LR image in [0, 1] is upsampled bicubically to ``upscale`` x its size (short side first raised to
   ``process_size / upscale``), floored to whole latent patches, and mapped to [-1, 1];
2. z = E(x) sampled from the posterior, times ``scaling_factor`` (no shift);
3. v = transformer(z, t = 1000, fixed prompt and pooled embeddings), in 64-latent tiles with Gaussian
   blending (``tiling.tsdsr_tiled``); z0 = z - v (σ = 1);
4. D(z0 / scaling_factor), clamped, to [0, 1], resized to exactly ``upscale`` x the LR if it was adjusted;
5. colour fix: wavelet (low frequencies of the bicubic LR; the default) or AdaIN (statistics of the LR).

``onestep_from_sd3`` turns that transformer (LoRA merged, prompt fixed) into hf-ext's
``OneStepSRTransformer2DModel``, the same function of the latent, on which TinySR's tools run (``precache``,
``keep_blocks``, the depth search).

Example:
    >>> pipe = TSDSRPipeline.from_tsdsr("sd3-medium", "checkpoint/tsdsr", "dataset/default")  # doctest: +SKIP
    >>> pipe("low_res.png").images[0].save("x4.png")                                         # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SD3Transformer2DModel
from diffusers.image_processor import VaeImageProcessor

from ...errors import HfExtError
from .pipeline_onestep_sr import COLOR_FIXES, OneStepSRPipeline
from .tiling import open_images, tsdsr_tiled

# LoraConfig targets, verbatim from TSD-SR (test_tsdsr.py / train.py)
TRANSFORMER_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj", "linear",
                       "proj_out"]
_RES = [f"encoder.down_blocks.{b}.resnets.{r}.{c}" for b in range(4) for r in range(2) for c in ("conv1", "conv2")]
VAE_TARGETS = (["encoder.conv_in"] + _RES + [f"encoder.down_blocks.{b}.downsamplers.0.conv" for b in range(3)]
               + [f"encoder.down_blocks.{b}.resnets.0.conv_shortcut" for b in (1, 2)]
               + [f"encoder.mid_block.attentions.0.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
               + [f"encoder.mid_block.resnets.{r}.{c}" for r in range(2) for c in ("conv1", "conv2")]
               + ["encoder.conv_out", "quant_conv"])
KEY_PREFIX = "transformer."                  # save_lora_weights' prefix, on both files
TIMESTEP = 1000.0                            # the one step: t = 1000, σ = 1
EMBED_FILES = ("prompt_embeds.pt", "pool_embeds.pt")


class TSDSRError(HfExtError, ValueError):
    """TSD-SR files that are missing or not in the released layout."""


def load_tsdsr_lora(model, path: str | Path, targets: list[str]) -> None:
    """Attach the TSD-SR LoRA file ``path`` to ``model`` (a diffusers model) as peft adapter "default"."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TSDSRError(f"{path} not found: TSD-SR ships transformer.safetensors and vae.safetensors in its "
                         "checkpoint folder (checkpoint/tsdsr)")
    sd = load_file(path)
    bad = [k for k in sd if not k.startswith(KEY_PREFIX) or not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad or not sd:
        raise TSDSRError(f"{path.name} is not in TSD-SR's key format: expected only keys like "
                         f"'{KEY_PREFIX}transformer_blocks.0.attn.to_q.lora_A.weight' (peft state dict saved by "
                         f"save_lora_weights), got {bad[:3] or 'no keys'}")
    sd = {k[len(KEY_PREFIX):]: v for k, v in sd.items()}
    rank = next(v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight"))
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))   # alpha = r: scale 1
    result = set_peft_model_state_dict(model, sd, adapter_name="default")
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise TSDSRError(f"{path.name} does not fit this {type(model).__name__}: {len(missing)} LoRA weights "
                         f"missing (e.g. {missing[:2]}), {len(result.unexpected_keys)} unexpected (e.g. "
                         f"{result.unexpected_keys[:2]}); is the base model SD3-medium?")


def load_tsdsr_embeddings(folder: str | Path, transformer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds (1, L, joint_attention_dim), pooled (1, pooled_projection_dim))`` from ``folder``."""
    folder, cfg = Path(folder), transformer.config
    missing = [f for f in EMBED_FILES if not (folder / f).is_file()]
    if missing:
        raise TSDSRError(f"{folder} lacks {missing}: TSD-SR ships {list(EMBED_FILES)} in dataset/default")
    prompt, pooled = (torch.load(folder / f, map_location="cpu", weights_only=True) for f in EMBED_FILES)
    prompt, pooled = prompt.reshape(1, -1, prompt.shape[-1]), pooled.reshape(1, -1)
    if prompt.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise TSDSRError(f"embeddings of width {prompt.shape[-1]} / {pooled.shape[-1]} do not fit this transformer "
                         f"({cfg.joint_attention_dim} / {cfg.pooled_projection_dim}): expected prompt_embeds.pt "
                         f"(1, 333, {cfg.joint_attention_dim}) and pool_embeds.pt (1, {cfg.pooled_projection_dim})")
    return prompt, pooled


class TSDSRPipeline(DiffusionPipeline):
    """One-step SR with TSD-SR's weights: a stock ``SD3Transformer2DModel`` and ``AutoencoderKL`` with LoRAs."""

    model_cpu_offload_seq = "vae->transformer->vae"

    def __init__(self, vae: AutoencoderKL, transformer: SD3Transformer2DModel, prompt_embeds: torch.Tensor,
                 pooled_prompt_embeds: torch.Tensor):
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer)
        self.prompt_embeds, self.pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds   # (1, L, J), (1, P)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=False)  # [0, 1]

    @classmethod
    def from_tsdsr(cls, base_dir: str | Path, lora_dir: str | Path, embeds_dir: str | Path, torch_dtype=None):
        """Load TSD-SR's files unchanged: SD3-medium in diffusers format (``base_dir``), its LoRA folder and its
        prompt-embedding folder. ``torch_dtype`` defaults to float32 (TSD-SR runs float16 on a GPU)."""
        dtype = torch_dtype or torch.float32
        base = Path(base_dir)
        if not (base / "transformer").is_dir() or not (base / "vae").is_dir():
            raise TSDSRError(f"{base} needs transformer/ and vae/ subfolders: give SD3-medium in diffusers format "
                             "(stabilityai/stable-diffusion-3-medium-diffusers)")
        transformer = SD3Transformer2DModel.from_pretrained(base / "transformer", torch_dtype=dtype).eval()
        vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=dtype).eval()
        load_tsdsr_lora(transformer, Path(lora_dir) / "transformer.safetensors", TRANSFORMER_TARGETS)
        load_tsdsr_lora(vae, Path(lora_dir) / "vae.safetensors", VAE_TARGETS)
        prompt, pooled = load_tsdsr_embeddings(embeds_dir, transformer)
        return cls(vae, transformer, prompt.to(dtype), pooled.to(dtype))

    def to_onestep(self):
        """This model as a ``OneStepSRPipeline`` (``latent_math="tsdsr"``): LoRAs merged, a plain ``AutoencoderKL``
        and ``onestep_from_sd3``'s transformer, which saves with ``save_pretrained`` (remote code included) and
        which TinySR's tools compress. Its LR tiles are blended in pixels, and small images are not raised to
        ``process_size``: on an image of one latent tile and >= process_size / upscale px it gives this
        pipeline's output."""
        vae = AutoencoderKL.from_config(self.vae.config)
        vae.load_state_dict(merged_state_dict(self.vae))
        one = onestep_from_sd3(self.transformer, self.prompt_embeds, self.pooled_prompt_embeds)
        vae = vae.to(self.vae.device)
        vae = vae if vae.dtype == self.vae.dtype else vae.to(dtype=self.vae.dtype)
        return OneStepSRPipeline(vae=vae.eval(), transformer=one, latent_math="tsdsr")

    def velocity(self, z: torch.Tensor) -> torch.Tensor:
        """v(z) (B, C, h, w) at t = 1000 with the fixed prompt, one transformer call."""
        B, dev, dt = z.shape[0], z.device, z.dtype
        return self.transformer(hidden_states=z, timestep=torch.full((B,), TIMESTEP, device=dev, dtype=dt),
                                encoder_hidden_states=self.prompt_embeds.to(dev, dt).expand(B, -1, -1),
                                pooled_projections=self.pooled_prompt_embeds.to(dev, dt).expand(B, -1)).sample

    @torch.no_grad()
    def __call__(self, image, upscale: int = 4, process_size: int = 512, latent_tile: int = 64,
                 latent_overlap: int = 8, color_fix: str | None = "wavelet", generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Super-resolve ``image`` (path, PIL, numpy HWC or tensor BCHW in [0, 1], or a list) by ``upscale``.

        ``latent_tile`` / ``latent_overlap`` (latent pixels) bound the transformer's memory; ``generator`` seeds
        the VAE posterior sample; ``color_fix`` is "wavelet" (TSD-SR's default), "adain" or None.
        """
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix={color_fix!r}; use one of {list(COLOR_FIXES)}")
        if int(upscale) != upscale or upscale < 1:
            raise ValueError(f"upscale={upscale}; give a whole factor >= 1")
        vae, dt = self.vae, self.vae.dtype
        lr = self.image_processor.preprocess(open_images(image)).to(self.device, dt)          # (B, 3, h, w)
        h, w = lr.shape[-2:]
        s = max(1.0, (process_size // upscale) / min(h, w))                                   # small LR: raise it
        m = self.vae_scale_factor * self.transformer.config.patch_size                        # px per latent patch
        H, W = (int(s * h) * upscale) // m * m, (int(s * w) * upscale) // m * m
        if min(H, W) < m:
            raise ValueError(f"image of {w}x{h} px gives an empty latent at x{upscale}; raise process_size")
        x = (F.interpolate(lr, size=(H, W), mode="bicubic", align_corners=False) * 2 - 1).clamp(-1, 1)
        z = vae.encode(x).latent_dist.sample(generator) * vae.config.scaling_factor           # (B, C, H/8, W/8)
        z0 = z - tsdsr_tiled(self.velocity, z, latent_tile, latent_overlap)
        sr = vae.decode(z0 / vae.config.scaling_factor).sample.clamp(-1, 1) / 2 + 0.5         # (B, 3, H, W)
        if (H, W) != (upscale * h, upscale * w):
            sr = F.interpolate(sr, size=(upscale * h, upscale * w), mode="bicubic", align_corners=False)
        if color_fix is not None:        # wavelet: the bicubic LR's low frequencies; AdaIN: the LR's statistics
            ref = lr if color_fix == "adain" else F.interpolate(lr, size=sr.shape[-2:], mode="bicubic", align_corners=False)
            sr = COLOR_FIXES[color_fix](sr, ref)
        sr = sr.clamp(0, 1).float()
        images = sr if output_type == "pt" else self.image_processor.postprocess(sr, output_type=output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every peft LoRA merged into its base layer (W + B A; on a copy) and the
    adapter keys gone: the weights of the plain model."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    src = copy.deepcopy(model)
    for m in src.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    return {k.replace(".base_layer.", "."): v for k, v in src.state_dict().items() if ".lora_" not in k}


@torch.no_grad()
def onestep_from_sd3(transformer: SD3Transformer2DModel, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                     timestep: float = TIMESTEP):
    """``OneStepSRTransformer2DModel`` computing ``transformer(z, timestep, prompt, pooled)`` for every latent z:
    LoRAs merged (peft's ``merge``, on a copy), the fixed prompt and pooled embeddings stored as its parameters,
    SD3's ``norm_out.linear`` as its ``norm_out_modulation``. TinySR's compression then works on it."""
    from .modeling_onestep_sr import OneStepSRTransformer2DModel

    cfg = transformer.config
    if cfg.qk_norm or cfg.dual_attention_layers or cfg.caption_projection_dim != cfg.num_attention_heads * cfg.attention_head_dim \
            or cfg.out_channels not in (None, cfg.in_channels):
        raise TSDSRError("onestep_from_sd3 takes SD3(-medium)-style transformers: no qk_norm or dual attention (SD3.5), "
                         "caption_projection_dim = inner dim, out_channels = in_channels")
    sd = merged_state_dict(transformer)
    sd["norm_out_modulation.weight"], sd["norm_out_modulation.bias"] = sd.pop("norm_out.linear.weight"), sd.pop("norm_out.linear.bias")
    prompt = prompt_embeds.reshape(1, -1, prompt_embeds.shape[-1])
    out = OneStepSRTransformer2DModel(in_channels=cfg.in_channels, patch_size=cfg.patch_size, num_layers=cfg.num_layers,
                                      num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
                                      joint_attention_dim=cfg.joint_attention_dim, pooled_projection_dim=cfg.pooled_projection_dim,
                                      prompt_length=prompt.shape[1], pos_embed_max_size=cfg.pos_embed_max_size,
                                      timestep=float(timestep))
    sd.update(prompt_embeds=prompt, pooled_projections=pooled_prompt_embeds.reshape(1, -1), block_mask=out.block_mask)
    out.load_state_dict(sd)                                             # strict: every weight accounted for
    out = out.to(transformer.device)
    return (out if out.dtype == transformer.dtype else out.to(dtype=transformer.dtype)).eval()
