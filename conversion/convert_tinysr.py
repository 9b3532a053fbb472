"""`hf-ext convert tinysr`: prune and distil a one-step SR teacher pipeline into a TinySR student."""
from __future__ import annotations

from .common import add_command, add_field, add_json_arg, add_output_args, emit, maybe_push


def add_parser(sub) -> None:
    add_command(sub, "tinysr", "TinySR: depth-prune, VAE-compress, distil and pre-cache a one-step SR pipeline",
                arguments, run)


def arguments(p) -> None:
    from hf_ext.sr import TinySRConfig as C

    p.add_argument("--teacher", required=True, help="a saved OneStepSRPipeline folder (e.g. tests/fixtures/sr_teacher)")
    add_field(p, C, "keep_blocks", required=True, help="transformer blocks the student keeps")
    add_field(p, C, "vae_width", required=True, help="the student VAE's first-block width (others scale)")
    add_field(p, C, "group_size", help="depth search: blocks per group")
    for name in ("search_steps", "distill_steps", "batch_size"):
        add_field(p, C, name)
    add_field(p, C, "crop", help="HR training crop in pixels")
    add_field(p, C, "lr")
    add_field(p, C, "degrade", choices=("realistic", "bicubic", "mixed"),
              help="training LR degradation; the teacher labels it, so mixed covers both")
    add_field(p, C, "output_weight", help="distillation weight of the student's whole path vs the teacher's image")
    add_field(p, C, "sepconv", help="keep the VAE's dense convs")
    add_field(p, C, "drop_text_stream",
              help="remove the transformer's prompt tokens before distilling (TinySR's TinySD3 transformer)")
    add_field(p, C, "seed")
    p.add_argument("--continue-from", metavar="DIR", help="a saved student: only distil it --distill-steps more")
    add_output_args(p)
    add_json_arg(p)


def run(args) -> None:
    import dataclasses
    import json
    from pathlib import Path

    from hf_ext.hub import check_output_dir, render_card, save_converted
    from hf_ext.sr import OneStepSRPipeline
    from hf_ext.sr.measure import compression_report
    from hf_ext.sr.tinysr import TinySRConfig, compress_tinysr, continue_distillation

    out = check_output_dir(args.out, args.overwrite)
    teacher = OneStepSRPipeline.from_pretrained(args.teacher)
    config = TinySRConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinySRConfig)})
    if args.continue_from:
        student, log = continue_distillation(OneStepSRPipeline.from_pretrained(args.continue_from), teacher, config)
        log["keep"] = json.loads(Path(args.continue_from, "hf_ext_report.json").read_text()).get("keep") \
            if Path(args.continue_from, "hf_ext_report.json").is_file() else None
    else:
        student, log = compress_tinysr(teacher, config)
    result = {"keep": log["keep"], **compression_report(teacher, student)}
    result["search_final_loss"], result["distill_final_loss"] = log.get("search_final_loss"), log["distill_final_loss"]
    card = render_card("tinysr", base_model=None, metrics=result, base_model_relation="finetune",
                       tags=["tinysr", "super-resolution"], args=args,
                       model_name=f"TinySR student ({student.transformer.config.num_layers} blocks, VAE width {args.vae_width})")
    out = save_converted(student, out, card=card, overwrite=args.overwrite, report={**result, **log})
    url = maybe_push(args, out)
    if url:
        result["pushed"] = url
    emit({**result, "out": str(out)}, args.json)
