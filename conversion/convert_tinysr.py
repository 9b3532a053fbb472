"""`hf-ext convert tinysr`: prune and distil a one-step SR teacher pipeline into a TinySR student."""
from __future__ import annotations

from .common import add_json_arg, add_output_args, emit, maybe_push


def add_parser(sub) -> None:
    p = sub.add_parser("tinysr", help="TinySR: depth-prune, VAE-compress, distil and pre-cache a one-step SR pipeline")
    p.add_argument("--teacher", required=True, help="a saved OneStepSRPipeline folder (e.g. tests/fixtures/sr_teacher)")
    p.add_argument("--keep-blocks", type=int, required=True, help="transformer blocks the student keeps")
    p.add_argument("--vae-width", type=int, required=True, help="the student VAE's first-block width (others scale)")
    p.add_argument("--group-size", type=int, default=4, help="depth search: blocks per group (default 4)")
    p.add_argument("--search-steps", type=int, default=300)
    p.add_argument("--distill-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=96, help="HR training crop in pixels (default 96)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--degrade", choices=("realistic", "bicubic", "mixed"), default="mixed",
                   help="training LR degradation; the teacher labels it, so mixed covers both (default)")
    p.add_argument("--output-weight", type=float, default=1.0,
                   help="distillation weight of the student's whole path vs the teacher's image (default 1)")
    p.add_argument("--no-sepconv", action="store_true", help="keep the VAE's dense convs")
    p.add_argument("--drop-text-stream", action="store_true",
                   help="remove the transformer's prompt tokens before distilling (TinySR's TinySD3 transformer)")
    p.add_argument("--continue-from", metavar="DIR", help="a saved student: only distil it --distill-steps more")
    add_output_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> None:
    import json
    from pathlib import Path

    import torch

    from hf_ext.macs import count_macs
    from hf_ext.hub import check_output_dir, render_card, save_converted
    from hf_ext.sr import OneStepSRPipeline
    from hf_ext.sr.data import eval_psnr
    from hf_ext.sr.tinysr import TinySRConfig, compress_tinysr, continue_distillation

    out = check_output_dir(args.out, args.overwrite)
    teacher = OneStepSRPipeline.from_pretrained(args.teacher)
    config = TinySRConfig(keep_blocks=args.keep_blocks, vae_width=args.vae_width, group_size=args.group_size,
                          search_steps=args.search_steps, distill_steps=args.distill_steps,
                          batch_size=args.batch_size, crop=args.crop, lr=args.lr, sepconv=not args.no_sepconv,
                          degrade=args.degrade, output_weight=args.output_weight,
                          drop_text_stream=args.drop_text_stream)
    if args.continue_from:
        student, log = continue_distillation(OneStepSRPipeline.from_pretrained(args.continue_from), teacher, config)
        log["keep"] = json.loads(Path(args.continue_from, "hf_ext_report.json").read_text()).get("keep") \
            if Path(args.continue_from, "hf_ext_report.json").is_file() else None
    else:
        student, log = compress_tinysr(teacher, config)
    result = {"keep": log["keep"]}
    lr = torch.rand(1, 3, 64, 64)
    for name, pipe in (("teacher", teacher), ("student", student)):
        pipe.set_progress_bar_config(disable=True)
        result[f"{name}_params"] = sum(p.numel() for m in (pipe.vae, pipe.transformer) for p in m.parameters())
        with torch.no_grad(), count_macs() as macs:
            pipe(lr, upscale=4, tile=64, output_type="pt")
        result[f"{name}_gmacs_256px"] = macs.total / 1e9
        result[f"{name}_psnr_y_x4"] = eval_psnr(pipe, 4)
    result["params_saved"] = 1 - result["student_params"] / result["teacher_params"]
    result["psnr_drop_x4"] = result["teacher_psnr_y_x4"] - result["student_psnr_y_x4"]
    result["search_final_loss"], result["distill_final_loss"] = log.get("search_final_loss"), log["distill_final_loss"]
    card = render_card("tinysr", base_model=None, metrics=result, base_model_relation="finetune",
                       tags=["tinysr", "super-resolution"], args=args,
                       model_name=f"TinySR student ({student.transformer.config.num_layers} blocks, VAE width {args.vae_width})")
    out = save_converted(student, out, card=card, overwrite=args.overwrite, report={**result, **log})
    url = maybe_push(args, out)
    if url:
        result["pushed"] = url
    emit({**result, "out": str(out)}, args.json)
