"""`hf-ext finetune meft`: fine-tune a classifier with MEFT reversible adapters, evaluate, save the adapter."""
from __future__ import annotations

import argparse
import sys

from .common import add_command, add_field, add_json_arg, add_output_args, emit, maybe_push


def add_parser(sub) -> None:
    add_command(sub, "meft", "MEFT reversible adapters on a classification task (activation-memory light)",
                arguments, run)


def arguments(p) -> None:
    from hf_ext.meft.train import FinetuneConfig as C

    add_field(p, C, "model", help="zoo name, local folder or Hub repo id")
    add_field(p, C, "task", help="task of hf_ext.tasks")
    add_field(p, C, "variant", choices=["meft1", "meft2", "meft3"],
              help="meft3 (best dev accuracy on docs-sections, see docs/meft.md), meft1 or meft2")
    add_field(p, C, "adapter_dim")
    add_field(p, C, "lam", type=float, help="x1 scale (default: measured safe default)")
    add_field(p, C, "beta", type=float, help="x2 scale (default: measured safe default)")
    add_field(p, C, "reconstruction_dtype", choices=["float64", "float32"])
    add_field(p, C, "epochs", help="passes over the train split (8: better than 5 for MEFT3 and full FT)")
    add_field(p, C, "batch_size")
    add_field(p, C, "max_length")
    add_field(p, C, "lr", type=float, help="learning rate (default: 2e-3 for MEFT)")
    add_field(p, C, "max_per_class", type=int,
              help="cap on train examples per class, a fixed sample spread over each class")
    add_field(p, C, "select_epoch", action=argparse.BooleanOptionalAction,
              help="keep the epoch with the best dev-split accuracy (default on)")
    add_field(p, C, "seed")
    add_output_args(p)
    add_json_arg(p)


def run(args) -> None:
    from hf_ext.hub import check_output_dir, render_card, save_converted
    from hf_ext.meft.train import FinetuneConfig, finetune
    from hf_ext.tasks import load_task
    from hf_ext.zoo import HUB_IDS, resolve_model

    check_output_dir(args.out, args.overwrite)
    load_task(args.task, "eval")  # a bad task name fails here, before the model loads
    resolve_model(args.model)
    cfg = FinetuneConfig(model=args.model, task=args.task, method="meft", variant=args.variant,
                         adapter_dim=args.adapter_dim, lam=args.lam, beta=args.beta,
                         reconstruction_dtype=args.reconstruction_dtype, epochs=args.epochs,
                         batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                         max_per_class=args.max_per_class, select_epoch=args.select_epoch,
                         seed=args.seed)
    model, tok, result = finetune(cfg)
    mcfg = model.peft_config["default"]
    result.update(lam=mcfg.lam, beta=mcfg.beta, label_names=list(load_task(args.task, "eval").label_names))
    shown = {k: v for k, v in result.items() if not isinstance(v, list) and k not in ("method", "lora_r")}
    card = render_card("meft", base_model=HUB_IDS.get(args.model, str(args.model)), base_model_relation="adapter",
                       metrics=shown,
                       tags=["meft", "peft", "reversible"], model_name=f"{args.model} MEFT ({args.variant}) "
                       f"on {args.task}", args=args, label_names=result["label_names"])
    out = save_converted(model, args.out, tokenizer=tok, card=card, overwrite=args.overwrite, report=result)
    url = maybe_push(args, out)
    if url:
        result["pushed"] = url
    print(f"saved {out}", file=sys.stderr)
    emit({**{k: v for k, v in result.items() if not isinstance(v, list)}, "out": str(out)}, args.json)
