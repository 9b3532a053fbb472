"""``OneStepSRPipeline``: LR image -> VAE encode -> one transformer step -> VAE decode (TSD-SR / TinySR).

The LR image is upsampled (bicubic) to the output size and encoded; its latent z_lr is the noisy latent
of the transformer's fixed timestep (``transformer.sigma``, flow matching), so one velocity prediction
gives z_hr = z_lr - sigma * v(z_lr), which is decoded. Large images are processed in overlapping LR tiles,
blended without seams (``tiling.py``), and the colours are taken from the upsampled LR image
(``color_fix="wavelet"`` or ``"adain"``, ``ops.py``). The fixed prompt and timestep live in the
transformer (pre-cached in a TinySR model), so no text encoder or scheduler is needed.

Example:
    >>> pipe = OneStepSRPipeline.from_pretrained("out/tinysr")                           # doctest: +SKIP
    >>> pipe(low_res, upscale=4, tile=64, color_fix="wavelet").images[0]                  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from .modeling_onestep_sr import OneStepSRTransformer2DModel
from .ops import adain_color_fix, wavelet_color_fix
from .tiling import open_images, progress_enabled, tiled_upscale

COLOR_FIXES = {"wavelet": wavelet_color_fix, "adain": adain_color_fix, None: None}
# how latents are made and read: hf-ext's (posterior mode, shift and scale) or TSD-SR's released weights'
# (posterior sample, scale only, decoder output clamped), see tsdsr.py
LATENT_MATH = ("hf-ext", "tsdsr")
HERE = Path(__file__).parent


def scale_latents(z: torch.Tensor, vae_config, latent_math: str = "hf-ext") -> torch.Tensor:
    """VAE latent -> the transformer's latent: (z - shift) * scale, or z * scale for TSD-SR's weights (no shift)."""
    shift = 0.0 if latent_math == "tsdsr" else (vae_config.shift_factor or 0.0)
    return (z - shift) * vae_config.scaling_factor


def unscale_latents(z: torch.Tensor, vae_config, latent_math: str = "hf-ext") -> torch.Tensor:
    """The inverse of ``scale_latents``: what the VAE decodes."""
    shift = 0.0 if latent_math == "tsdsr" else (vae_config.shift_factor or 0.0)
    return z / vae_config.scaling_factor + shift


def add_remote_code(folder: str | Path) -> None:
    """Make a saved pipeline folder load where hf-ext is not installed: copy this file and the files it imports
    beside ``model_index.json`` and each custom component's modeling file into its folder, and name them there
    (``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``). The copied files sit together in
    this folder (``hf_ext/sr/onestep/``) and import only each other, torch and diffusers."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("pipeline_onestep_sr.py", "modeling_onestep_sr.py", "modeling_sepconv_vae.py", "ops.py", "tiling.py"):
        shutil.copyfile(HERE / name, folder / name)
    index["_class_name"] = ["pipeline_onestep_sr", "OneStepSRPipeline"]
    for component, entry in index.items():
        if isinstance(entry, list) and entry[0].startswith("hf_ext."):
            module = entry[0].rsplit(".", 1)[1]
            shutil.copyfile(HERE / f"{module}.py", folder / component / f"{module}.py")
            index[component] = [module, entry[1]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class OneStepSRPipeline(DiffusionPipeline):
    """One-step diffusion super-resolution with a ``AutoencoderKL`` and a ``OneStepSRTransformer2DModel``."""

    model_cpu_offload_seq = "vae->transformer->vae"

    def __init__(self, vae: AutoencoderKL, transformer: OneStepSRTransformer2DModel, latent_math: str = "hf-ext"):
        super().__init__()
        if latent_math not in LATENT_MATH:
            raise ValueError(f"latent_math={latent_math!r}; use one of {LATENT_MATH}")
        self.register_modules(vae=vae, transformer=transformer)
        self.register_to_config(latent_math=latent_math)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False)   # [-1, 1] tensors

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, **components):
        """Load a saved pipeline (a folder or a Hub repo) with hf-ext's own classes. The folder also carries
        remote code, for ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` without hf-ext;
        diffusers' loader would insist on that code, so this one reads ``model_index.json`` itself. Components
        passed as keywords (``vae=...``, ``transformer=...``) are used as given."""
        from diffusers import AutoencoderKL

        from .modeling_sepconv_vae import SepConvAutoencoderKL

        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(pretrained_model_name_or_path)))
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder} has no model_index.json: point at a saved OneStepSRPipeline folder")
        index = json.loads((folder / "model_index.json").read_text())
        classes = {c.__name__: c for c in (AutoencoderKL, SepConvAutoencoderKL, OneStepSRTransformer2DModel)}
        for name in ("vae", "transformer"):
            if components.get(name) is None:
                klass = classes.get(index.get(name, [None, None])[1])
                if klass is None:
                    raise ValueError(f"{folder}/model_index.json names {index.get(name)} for '{name}'; this "
                                     f"pipeline loads {sorted(classes)}")
                components[name] = klass.from_pretrained(folder / name, torch_dtype=torch_dtype or torch.float32)
        return cls(**components, latent_math=index.get("latent_math", "hf-ext"))

    def save_pretrained(self, save_directory, **kwargs):
        """``DiffusionPipeline.save_pretrained``, plus the code to load it without hf-ext (``add_remote_code``)."""
        super().save_pretrained(save_directory, **kwargs)
        add_remote_code(save_directory)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> scaled latent (B, C, H/f, W/f)."""
        post, math = self.vae.encode(x).latent_dist, self.config.latent_math
        return scale_latents(post.sample(generator) if math == "tsdsr" else post.mode(), self.vae.config, math)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image (B, 3, H, W) in [-1, 1] (clamped for TSD-SR's weights, as it does)."""
        x = self.vae.decode(unscale_latents(z, self.vae.config, self.config.latent_math)).sample
        return x.clamp(-1, 1) if self.config.latent_math == "tsdsr" else x

    def step(self, z_lr: torch.Tensor) -> torch.Tensor:
        """z_hr = z_lr - sigma * v(z_lr), the one step."""
        return z_lr - self.transformer.sigma * self.transformer(z_lr)

    def upscale_tile(self, lr: torch.Tensor, upscale: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """LR (B, 3, h, w) in [-1, 1] -> SR (B, 3, s*h, s*w), padded inside to the latent grid."""
        h, w = lr.shape[-2:]
        m = self.vae_scale_factor * self.transformer.config.patch_size
        H, W = math.ceil(upscale * h / m) * m, math.ceil(upscale * w / m) * m
        up = F.interpolate(lr, scale_factor=upscale, mode="bicubic", align_corners=False)
        up = F.pad(up, (0, W - up.shape[-1], 0, H - up.shape[-2]), mode="replicate")
        if self.config.latent_math == "tsdsr":
            up = up.clamp(-1, 1)                                   # TSD-SR clamps bicubic's overshoot
        return self.decode(self.step(self.encode(up, generator)))[..., :upscale * h, :upscale * w]

    @torch.no_grad()
    def __call__(self, image, upscale: int = 4, tile: int = 64, tile_overlap: int = 8,
                 color_fix: str | None = "wavelet", output_type: str = "pil", return_dict: bool = True,
                 generator: torch.Generator | None = None):
        """Super-resolve ``image`` (a file path, PIL, numpy HWC in [0, 1], tensor BCHW in [0, 1], or a list) by
        ``upscale``, one of the transformer's ``trained_upscales``.

        ``tile`` and ``tile_overlap`` are in LR pixels and bound the memory (a tile is capped at what the
        transformer's positional embedding covers); ``color_fix`` takes colours
        from the bicubic upsampled input (``"wavelet"``, ``"adain"`` or None); ``generator`` seeds the VAE
        posterior sample where ``latent_math="tsdsr"`` draws one.
        """
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix={color_fix!r}; use one of {list(COLOR_FIXES)}")
        if int(upscale) != upscale or upscale < 1:
            raise ValueError(f"upscale={upscale}; give a whole factor >= 1")
        trained = self.transformer.config.trained_upscales
        if trained and upscale not in trained:
            raise ValueError(f"upscale={upscale}: this model was trained for x{' and x'.join(map(str, trained))} "
                             "only; pick one of those (or resize the output)")
        lr = self.image_processor.preprocess(open_images(image)).to(self.device, self.vae.dtype)   # (B, 3, h, w)
        patch = self.vae_scale_factor * self.transformer.config.patch_size             # pixels per latent patch
        if upscale * min(lr.shape[-2:]) < patch:
            raise ValueError(f"image of {lr.shape[-1]}x{lr.shape[-2]} px is smaller than one latent patch at "
                             f"x{upscale} ({patch} output px per side); give at least "
                             f"{-(-patch // upscale)} px per side")
        reach = self.transformer.config.pos_embed_max_size * patch // upscale      # LR px the pos-embedding covers
        tile = min(tile, reach)
        sr = tiled_upscale(lambda t: self.upscale_tile(t, upscale, generator), lr, upscale, tile, min(tile_overlap, tile // 4),
                           progress=progress_enabled(self))
        if color_fix is not None:
            ref = F.interpolate(lr, scale_factor=upscale, mode="bicubic", align_corners=False)
            sr = COLOR_FIXES[color_fix](sr, ref)
        sr = sr.clamp(-1, 1) if output_type == "pt" else sr.clamp(-1, 1).float()   # numpy has no bfloat16
        images = self.image_processor.postprocess(sr, output_type=output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
