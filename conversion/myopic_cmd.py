"""`hf-ext myopic synthetic` and `hf-ext myopic gap`: myopic training, measured."""
from __future__ import annotations

import sys

from .common import add_command, add_field, add_group, add_json_arg, emit, maybe_push


def add_parser(sub) -> None:
    my = add_group(sub, "myopic", "myopic training (no gradient to past positions)", dest="myopic_cmd")
    add_command(my, "synthetic", "the paper's pre-caching task: vanilla vs myopic, losses and probe R^2",
                synthetic_arguments, run_synthetic)
    add_command(my, "gap", "fine-tune vanilla and myopic copies of an LM, report the held-out gap", gap_arguments,
                run_gap)


def synthetic_arguments(p) -> None:
    from hf_ext.myopic.synthetic import MODELS
    from hf_ext.myopic.synthetic import SyntheticConfig as C

    add_field(p, C, "p", help="probability of a sum target")
    add_field(p, C, "steps")
    add_field(p, C, "batch_size")
    add_field(p, C, "lr")
    add_field(p, C, "curriculum", help="fraction of steps over which the training frequency ramps 1 -> 10 (0 = the "
                                       "paper's fixed 10)")
    add_field(p, C, "seed")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                   help="which models to train (default: both)")
    add_json_arg(p)


def gap_arguments(p) -> None:
    from hf_ext.myopic.gap import GapConfig as C

    add_field(p, C, "model", help="zoo name, local folder or Hub repo id")
    for name in ("train_text", "eval_text", "steps", "seq_len", "batch_size", "lr"):
        add_field(p, C, name)
    add_field(p, C, "local_window", type=int, help="local myopic: gradients within w positions (default: myopic)")
    add_field(p, C, "eval_tokens")
    add_field(p, C, "seed")
    p.add_argument("--out", help="also save the myopic model here (with a model card)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--push-to-hub", metavar="REPO_ID")
    p.add_argument("--endpoint")
    add_json_arg(p)


def run_synthetic(args) -> None:
    from hf_ext.myopic.synthetic import MODELS, SyntheticConfig, run_synthetic

    try:
        cfg = SyntheticConfig(**{k: getattr(args, k) for k in ("p", "steps", "batch_size", "lr", "curriculum", "seed")})
    except ValueError as e:
        from hf_ext.errors import BadTextError

        raise BadTextError(str(e)) from e
    r = run_synthetic(cfg, models=args.models)
    flat = {"p": cfg.p, "steps": cfg.steps, "curriculum": cfg.curriculum, "seed": cfg.seed,
            "trivial_normalized_loss": r["trivial_normalized_loss"]}
    for name in MODELS:
        for k, v in r.get(name, {}).items():                    # the loss curve is a list: 4 decimals
            flat[f"{name}_{k}"] = [round(x, 4) for x in v] if isinstance(v, list) else v
    emit(flat, args.json)


def run_gap(args) -> None:
    from hf_ext.hub import check_output_dir, render_card, save_converted
    from hf_ext.myopic import MyopicError
    from hf_ext.myopic.gap import GapConfig, myopia_gap
    from hf_ext.zoo import HUB_IDS

    if args.out:
        check_output_dir(args.out, args.overwrite)
    if args.local_window is not None and args.local_window < 1:
        raise MyopicError(f"--local-window {args.local_window}: give a window of at least 1 position (1 = myopic)")
    cfg = GapConfig(model=args.model, train_text=args.train_text, eval_text=args.eval_text, steps=args.steps,
                    seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, local_window=args.local_window,
                    eval_tokens=args.eval_tokens, seed=args.seed)
    report, models = myopia_gap(cfg)
    if args.out:
        card = render_card("myopic", base_model=HUB_IDS.get(args.model, str(args.model)),
                           base_model_relation="finetune", metrics=report, tags=["myopic"], args=args,
                           model_name=f"{args.model}, fine-tuned myopically")
        out = save_converted(models["myopic"], args.out, tokenizer=models["tokenizer"], card=card,
                             overwrite=args.overwrite, report=report)
        print(f"saved {out}", file=sys.stderr)
        report["out"] = str(out)
        url = maybe_push(args, out)
        if url:
            report["pushed"] = url
    emit(report, args.json)
