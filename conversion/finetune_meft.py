"""`hf-ext finetune meft`: fine-tune a classifier with MEFT reversible adapters, evaluate, save the adapter."""
from __future__ import annotations

import argparse
import sys

from .common import add_json_arg, add_output_args, emit, maybe_push


def add_parser(sub) -> None:
    p = sub.add_parser("meft", help="MEFT reversible adapters on a classification task (activation-memory light)")
    p.add_argument("--model", default="minilm-l6", help="zoo name, local folder or Hub repo id (default minilm-l6)")
    p.add_argument("--task", default="docs-sections", help="task of hf_ext.tasks (default docs-sections)")
    p.add_argument("--variant", choices=["meft1", "meft2", "meft3"], default="meft3",
                   help="meft3 (default: best dev accuracy on docs-sections, see README), meft1 or meft2")
    p.add_argument("--adapter-dim", type=int, default=16)
    p.add_argument("--lam", type=float, default=None, help="x1 scale (default: measured safe default)")
    p.add_argument("--beta", type=float, default=None, help="x2 scale (default: measured safe default)")
    p.add_argument("--reconstruction-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--epochs", type=int, default=8,
                   help="passes over the train split (default 8: better than 5 for MEFT3 and full FT, README)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3)")
    p.add_argument("--max-per-class", type=int, default=400,
                   help="cap on train examples per class, a fixed sample spread over each class (default 400)")
    p.add_argument("--select-epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the epoch with the best dev-split accuracy (default on)")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


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
