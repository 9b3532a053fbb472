"""Train the tiny class-conditional DiT that the ICC benchmark and tests run on (no DiT weights offline).

    python benchmarks/train_tiny_dit.py --steps 5000 --out tests/fixtures/tiny_dit
    python benchmarks/train_tiny_dit.py --family pixart --steps 5000 --out tests/fixtures/tiny_pixart

``--family pixart``: the same trainer on diffusers' ``PixArtTransformer2DModel`` (adaLN-single, cross-
attention), the class given as a one-hot "caption" of 27 channels (26 photos + the null class for guidance,
dropped 10% of the time here, as DiT's label embedding does itself), so the ICC benchmark has a second family.

Data: 16x16 random crops (with horizontal flips) of scikit-image's real photos, each resized so its
shorter side is 48 px; the class is the photo (26 classes), so samples of a class should look like
pieces of that photo. Model: diffusers ``DiTTransformer2DModel`` in pixel space (patch 2, so 64 tokens;
6 layers, width 128, about 2M parameters), epsilon prediction, DDPM noise schedule (1000 steps, linear betas), AdamW
(cosine schedule with warmup) with an EMA of the weights, through accelerate; labels are dropped 10% of the time by the model's own
label embedding, so classifier-free guidance works. Writes the EMA weights (fp16 safetensors) and
``training.json`` (loss curve) to ``--out`` and a grid of samples (DDIM, 50 steps) next to real crops.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE, SHORT, PATCH = 16, 48, 2


def load_photos() -> list[torch.Tensor]:
    from PIL import Image

    from hf_ext.zoo import real_images

    out = []
    for p in real_images():
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = SHORT / min(im.size)
            im = im.resize((max(SHORT, round(im.size[0] * s)), max(SHORT, round(im.size[1] * s))), Image.Resampling.BICUBIC)
            out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)  # (3, H, W) in [-1, 1]
    return out


def crops(photos, n: int, g: torch.Generator, labels: torch.Tensor | None = None):
    """(n, 3, SIZE, SIZE) crops and their labels."""
    labels = torch.randint(0, len(photos), (n,), generator=g) if labels is None else labels
    xs = []
    for y in labels.tolist():
        p = photos[y]
        i = torch.randint(0, p.shape[1] - SIZE + 1, (1,), generator=g).item()
        j = torch.randint(0, p.shape[2] - SIZE + 1, (1,), generator=g).item()
        c = p[:, i:i + SIZE, j:j + SIZE]
        xs.append(c.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else c)
    return torch.stack(xs), labels


def build_model(num_classes: int, family: str = "dit"):
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    if family == "pixart":
        return PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3,
                                        num_layers=6, sample_size=SIZE, patch_size=PATCH, cross_attention_dim=128,
                                        caption_channels=num_classes + 1, norm_num_groups=1)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3,
                                 num_layers=6, sample_size=SIZE, patch_size=PATCH, num_embeds_ada_norm=num_classes,
                                 norm_num_groups=1)


def num_classes(model) -> int:
    """Real classes; the index after them is the null class of classifier-free guidance."""
    caption = model.config.get("caption_channels")
    return caption - 1 if caption else model.config.num_embeds_ada_norm


def denoise(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's prediction for (B, 3, S, S) latents at timesteps t (B,), labels (B,) (null class allowed)."""
    if model.config.get("caption_channels"):                              # PixArt: the class as a one-hot caption
        caption = F.one_hot(labels, model.config.caption_channels).to(x.dtype)[:, None]     # (B, 1, C + 1)
        return model(x, encoder_hidden_states=caption, timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return model(x, timestep=t, class_labels=labels).sample


@torch.no_grad()
def sample(model, labels: torch.Tensor, steps: int = 50, guidance: float = 1.5, seed: int = 0,
           on_step=None) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance (cond and uncond in one batch); returns (B, 3, size, size) in
    [-1, 1]. ``on_step(i, t)`` is called before each denoiser call."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    x = torch.randn(len(labels), model.config.in_channels, size, size, generator=g)
    null = torch.full_like(labels, num_classes(model))
    for i, t in enumerate(sched.timesteps):
        if on_step is not None:
            on_step(i, t)
        if guidance == 1.0:
            eps = denoise(model, x, t.expand(len(x)), labels)
        else:
            both = denoise(model, torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([labels, null]))
            cond, uncond = both.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        x = sched.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    from PIL import Image

    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)     # (3, rows*SIZE, cols*SIZE)
    img = ((grid.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    Image.fromarray(img).resize((img.shape[1] * 6, img.shape[0] * 6), Image.Resampling.NEAREST).save(path)


def main():
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=["dit", "pixart"], default="dit")
    ap.add_argument("--out", default="tests/fixtures/tiny_dit")
    args = ap.parse_args()
    acc = Accelerator()
    torch.manual_seed(args.seed)
    photos = load_photos()
    model = build_model(len(photos), args.family)
    ema = EMAModel(model.parameters(), decay=0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(200, args.steps // 10), num_training_steps=args.steps)
    model, opt, lr_sched = acc.prepare(model, opt, lr_sched)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    g = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc="tiny DiT", disable=not acc.is_main_process)
    for step in bar:
        x0, y = crops(photos, args.batch_size, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        if args.family == "pixart":                                       # DiT's label embedding drops its own
            y = torch.where(torch.rand(len(y), generator=g) < 0.1, len(photos), y)
        pred = denoise(model, xt.to(acc.device), t.to(acc.device), y.to(acc.device))
        loss = F.mse_loss(pred.float(), noise.to(acc.device))
        acc.backward(loss)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(acc.unwrap_model(model).parameters())
        curve.append(loss.item())
        bar.set_postfix(loss=f"{sum(curve[-50:]) / len(curve[-50:]):.4f}")
    seconds = time.perf_counter() - t0
    model = acc.unwrap_model(model).eval()
    ema.copy_to(model.parameters())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    model.float()
    labels = torch.arange(8).repeat_interleave(4)
    samples = sample(model, labels)
    real, _ = crops(photos, len(labels), torch.Generator().manual_seed(1), labels)
    save_grid([real[i::4] for i in range(2)] + [samples[i::4] for i in range(4)], out / "samples.png")
    smooth = [float(np.mean(curve[max(0, i - 99):i + 1])) for i in range(0, len(curve), 50)]
    (out / "training.json").write_text(json.dumps({
        "command": "python benchmarks/train_tiny_dit.py " + " ".join(sys.argv[1:]), "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()),
        "loss_every_50_steps_mean_of_100": smooth, "final_loss_mean_of_100": float(np.mean(curve[-100:])),
        "grid": "samples.png: rows 1-2 real crops of classes 0-7, rows 3-6 samples of the same classes (DDIM 50, cfg 1.5)"},
        indent=1))
    print(f"saved {out} ({seconds:.0f} s, final loss {np.mean(curve[-100:]):.4f})")


if __name__ == "__main__":
    main()
