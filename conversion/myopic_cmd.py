"""`hf-ext myopic synthetic` and `hf-ext myopic gap`: myopic training, measured."""
from __future__ import annotations

import sys

from .common import add_json_arg, emit, maybe_push


def add_parsers(sub) -> None:
    my = sub.add_parser("myopic", help="myopic training (no gradient to past positions)").add_subparsers(
        dest="myopic_cmd", required=True)
    p = my.add_parser("synthetic", help="the paper's pre-caching task: vanilla vs myopic, losses and probe R^2",
                      description="Unset options take hf_ext.myopic.synthetic.SyntheticConfig's defaults (the CPU "
                                  "recipe: p 0.3, 20000 steps of 64 sequences, lr 3e-3, curriculum 0.3).")
    p.add_argument("--p", type=float, help="probability of a sum target")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--curriculum", type=float,
                   help="fraction of steps over which the training frequency ramps 1 -> 10 (0 = the paper's fixed 10)")
    p.add_argument("--seed", type=int, default=0)
    add_json_arg(p)
    p.set_defaults(func=run_synthetic)

    p = my.add_parser("gap", help="fine-tune vanilla and myopic copies of an LM, report the held-out gap")
    p.add_argument("--model", default="smollm2-135m", help="zoo name, local folder or Hub repo id")
    p.add_argument("--train-text", default="python-docs:train")
    p.add_argument("--eval-text", default="python-docs:eval")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--local-window", type=int, default=None, help="local myopic: gradients within w positions")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also save the myopic model here (with a model card)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--push-to-hub", metavar="REPO_ID")
    p.add_argument("--endpoint")
    add_json_arg(p)
    p.set_defaults(func=run_gap)


def run_synthetic(args) -> None:
    from hf_ext.myopic.synthetic import SyntheticConfig, run_synthetic

    try:
        given = {k: getattr(args, k) for k in ("p", "steps", "batch_size", "lr", "curriculum")}
        cfg = SyntheticConfig(seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        from hf_ext.errors import BadTextError

        raise BadTextError(str(e)) from e
    r = run_synthetic(cfg)
    flat = {"p": cfg.p, "steps": cfg.steps, "curriculum": cfg.curriculum,
            "trivial_normalized_loss": r["trivial_normalized_loss"]}
    for name in ("vanilla", "myopic"):
        flat.update({f"{name}_{k}": v for k, v in r[name].items()})
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
