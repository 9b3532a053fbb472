"""`hf-ext convert export`: a zoo/Hub/local model -> a clean fp32 safetensors folder with a model card.

This is the plainest conversion (no technique applied); it is the foundation every other one builds on
and the main job of README command A until a technique takes its place.
"""
from __future__ import annotations

from .common import add_command, add_eval_args, add_json_arg, add_output_args, emit, load_source, maybe_push


def add_parser(sub) -> None:
    add_command(sub, "export", "save a model as a clean fp32 safetensors folder + model card", arguments, run)


def arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="zoo name, local folder, or Hub repo id")
    add_output_args(p)
    add_eval_args(p)
    add_json_arg(p)


def run(args) -> None:
    from hf_ext.eval import perplexity
    from hf_ext.hub import render_card, save_converted
    from hf_ext.zoo import HUB_IDS

    text, model, tok = load_source(args)
    r = perplexity(model, tok, text, max_tokens=args.max_tokens, window=args.window)
    metrics = {"ppl": r["ppl"], "eval_tokens": r["tokens"], "eval_text": args.eval_text, "window": args.window,
               "params": sum(p.numel() for p in model.parameters())}
    base = HUB_IDS.get(args.model, str(args.model))
    card = render_card("export", base_model=base, base_model_relation="quantized" if args.model in HUB_IDS else "finetune",
                       metrics=metrics, model_name=f"{args.model} (fp32 safetensors)")
    out = save_converted(model, args.out, tokenizer=tok, card=card, overwrite=args.overwrite, report=metrics)
    url = maybe_push(args, out)
    emit({**metrics, "model": args.model, "out": str(out), **({"pushed": url} if url else {})}, args.json)
