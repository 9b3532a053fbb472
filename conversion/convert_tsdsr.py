"""`hf-ext convert tsdsr`: TSD-SR's released files (SD3-medium + LoRAs + prompt embeddings) as one pipeline folder."""
from __future__ import annotations

from .common import add_command, add_json_arg, add_output_args, emit, maybe_push


def add_parser(sub) -> None:
    add_command(sub, "tsdsr", "TSD-SR's released weights as one OneStepSRPipeline folder (LoRAs merged)", arguments, run)


def arguments(p) -> None:
    p.add_argument("--base", required=True, help="SD3-medium in diffusers format (transformer/, vae/)")
    p.add_argument("--lora", required=True, help="TSD-SR's LoRA folder (transformer.safetensors, vae.safetensors)")
    p.add_argument("--embeds", required=True, help="TSD-SR's embedding folder (prompt_embeds.pt, pool_embeds.pt)")
    p.add_argument("--precache", action="store_true", help="store the fixed prompt and timestep's embeddings and "
                   "modulations, dropping the modules that made them (bit-identical; TinySR)")
    add_output_args(p)
    add_json_arg(p)


def run(args) -> None:
    import torch

    from hf_ext.hub import check_output_dir, render_card, save_converted
    from hf_ext.sr import TSDSRPipeline, precache

    out = check_output_dir(args.out, args.overwrite)
    source = TSDSRPipeline.from_tsdsr(args.base, args.lora, args.embeds)
    pipe = source.to_onestep()
    if args.precache:
        pipe.register_modules(transformer=precache(pipe.transformer))
    # the check: a 32 px LR image (one latent tile at x4, not raised by process_size) through both, same sample
    lr = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(upscale=4, output_type="pt")
    want = source(lr, process_size=4 * 32, generator=torch.Generator().manual_seed(1), **kw).images
    pipe.set_progress_bar_config(disable=True)
    got = pipe(lr, generator=torch.Generator().manual_seed(1), **kw).images
    result = {"transformer_blocks": pipe.transformer.config.num_layers, "precached": bool(args.precache),
              "params": sum(p.numel() for m in (pipe.vae, pipe.transformer) for p in m.parameters()),
              "max_abs_diff_vs_tsdsr": float((got - want).abs().max())}
    card = render_card("tsdsr", base_model="stabilityai/stable-diffusion-3-medium-diffusers", metrics=result,
                       base_model_relation="adapter", tags=["tsd-sr", "super-resolution"], args=args,
                       model_name="TSD-SR (SD3-medium, LoRAs merged)")
    out = save_converted(pipe, out, card=card, overwrite=args.overwrite, report=result)
    url = maybe_push(args, out)
    if url:
        result["pushed"] = url
    emit({**result, "out": str(out)}, args.json)
