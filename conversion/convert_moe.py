"""`hf-ext convert moe`: a dense Llama-family LM -> Read-ME pre-gated MoE (experts, router, tuning rounds)."""
from __future__ import annotations

from .common import add_command, add_eval_args, add_json_arg, add_output_args, emit, load_source, maybe_push


def add_parser(sub) -> None:
    add_command(sub, "moe", "split the MLPs into Read-ME experts with a pre-gating router over token ids", arguments,
                run)


def arguments(p) -> None:
    from hf_ext.moe.tune import TuneConfig

    d = TuneConfig()
    p.add_argument("--model", default="smollm2-135m", help="zoo name, local folder or Hub repo id")
    p.add_argument("--experts", type=int, default=8, help="routed experts per layer, D (default 8)")
    p.add_argument("--top-p", type=float, default=0.5, help="fraction of each MLP a token uses (default 0.5)")
    p.add_argument("--calib-text", default="python-docs:train",
                   help="calibration, router and tuning text: a file, a folder or python-docs:train (default)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="tokens of --calib-text for the expert masks")
    p.add_argument("--train-tokens", type=int, default=d.router_windows * d.seq_len,
                   help="tokens after them that each router round trains on (default %(default)s)")
    p.add_argument("--router-epochs", type=int, default=d.router_epochs)
    p.add_argument("--tune-tokens", type=int, default=d.tokens,
                   help="expert-tuning tokens (KL to the dense model), all rounds together; 0 trains the router only "
                        "(default %(default)s: about 15 min on 2 CPU cores)")
    p.add_argument("--tune-rounds", type=int, default=d.rounds, help="router + expert rounds (default %(default)s)")
    p.add_argument("--tune-lr", type=float, default=d.lr, help="the experts' peak learning rate")
    p.add_argument("--checkpoint-dir", default=None,
                   help="tuning state and token store, for resuming an interrupted run (default: OUT.tune/, "
                        "removed once the model is saved)")
    add_eval_args(p)
    add_output_args(p)
    add_json_arg(p)


def _windows(ids, n: int, length: int = 128):
    import torch

    ids = ids[: (min(n, len(ids)) // length) * length]
    return [{"input_ids": w[None], "attention_mask": torch.ones(1, length, dtype=torch.long)} for w in ids.view(-1, length)]


def _store(ids, tok, folder):
    """The tuning text as an hf-ext token store of 256-token windows (written once, reused on resume)."""
    from hf_ext.data import Field, ShardedDataset, StoreWriter

    if not (folder / "index.json").exists():
        n = len(ids) // 256
        with StoreWriter(folder, [Field("input_ids", "int32", (256,))], {"vocab_size": len(tok)}, overwrite=True) as w:
            w.write_batch({"input_ids": ids[: n * 256].view(n, 256).int()})
    return ShardedDataset(folder)


def run(args) -> None:
    import shutil
    import warnings
    from pathlib import Path

    from hf_ext.eval import perplexity, tokenize
    from hf_ext.hub import check_output_dir, render_card, save_converted
    from hf_ext.moe import MoEError, activation_stats, convert_to_pregated_moe, expert_masks
    from hf_ext.moe.tune import TuneConfig, tune
    from hf_ext.zoo import HUB_IDS, load_corpus

    if args.experts < 2:
        raise MoEError(f"--experts {args.experts}: give at least 2 routed experts")
    if not 0 < args.top_p <= 1:
        raise MoEError(f"--top-p {args.top_p} must lie in (0, 1]")
    if args.tune_tokens < 0 or args.tune_rounds < 1 or args.train_tokens < 256:
        raise MoEError(f"--tune-tokens {args.tune_tokens}, --tune-rounds {args.tune_rounds}, --train-tokens "
                       f"{args.train_tokens}: give tune tokens >= 0, at least 1 round and 256 router tokens")
    check_output_dir(args.out, args.overwrite)
    eval_text, model, tok = load_source(args)
    ids = tokenize(tok, load_corpus(args.calib_text), args.calib_tokens + max(args.train_tokens, args.tune_tokens))
    calib = _windows(ids, args.calib_tokens)
    rest, need = len(ids) - args.calib_tokens, 4 * 256 if args.tune_tokens else 256   # one tuning batch: 4 x 256
    if len(calib) < 1 or rest < need:
        raise MoEError(f"--calib-text gave {len(ids)} tokens; it needs --calib-tokens ({args.calib_tokens}) for the "
                       f"expert masks plus at least {need} for the router and tuning. Give more text, or lower "
                       f"--calib-tokens to about half of it")
    if args.tune_tokens > 4 * rest:
        warnings.warn(f"tuning reads {args.tune_tokens} tokens from {rest} of --calib-text, each about "
                      f"{args.tune_tokens // rest} times: the experts may overfit it. Give more text for a better "
                      "model", stacklevel=1)
    masks = expert_masks(activation_stats(model, calib, clusters=args.experts), args.top_p)   # k-means clusters
    moe = convert_to_pregated_moe(model, masks)
    ckpt = Path(args.checkpoint_dir or f"{str(args.out).rstrip('/')}.tune")
    cfg = TuneConfig(tokens=args.tune_tokens, rounds=args.tune_rounds if args.tune_tokens else 1, lr=args.tune_lr,
                     router_windows=args.train_tokens // 256, router_epochs=args.router_epochs,
                     checkpoint_dir=str(ckpt / "state"))
    log = tune(moe, model, _store(ids[args.calib_tokens:], tok, ckpt / "tokens"), cfg)
    ev = dict(max_tokens=args.max_tokens, window=args.window)
    last = log["rounds"][-1]
    result = {"model": args.model, "experts": args.experts, "top_p": args.top_p,
              "active_mlp_fraction": moe.config.active_mlp_fraction,
              "ppl_source": perplexity(model, tok, eval_text, **ev)["ppl"],
              "ppl_converted": perplexity(moe, tok, eval_text, **ev)["ppl"],
              "router_train_tokens": min(cfg.router_windows, (len(ids) - args.calib_tokens) // 256) * 256,
              "router_target_accuracy": next(r["router_target_accuracy"] for r in reversed(log["rounds"])
                                             if "router_target_accuracy" in r),
              "tune_tokens": log["tokens"], "tune_rounds": cfg.rounds,
              "tune_first_kl": log["rounds"][0].get("kl_first"), "tune_final_kl": last.get("kl_last")}
    card = render_card("moe", base_model=HUB_IDS.get(args.model, args.model), metrics=result,
                       base_model_relation="finetune", tags=["moe", "read-me"],
                       model_name=f"{args.model} -> pre-gated MoE ({args.experts} experts, top-p {args.top_p})",
                       args=args)
    out = save_converted(moe, args.out, tokenizer=tok, card=card, overwrite=args.overwrite, report=result)
    if not args.checkpoint_dir:
        shutil.rmtree(ckpt, ignore_errors=True)
    url = maybe_push(args, out)
    if url:
        result["pushed"] = url
    emit({**result, "out": str(out)}, args.json)
