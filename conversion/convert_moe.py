"""`hf-ext convert moe`: a dense Llama-family LM -> Read-ME pre-gated MoE (experts, trained router), verified."""
from __future__ import annotations

from .common import add_eval_args, add_json_arg, add_output_args, emit, load_source, maybe_push


def add_parser(sub) -> None:
    p = sub.add_parser("moe", help="split the MLPs into Read-ME experts with a pre-gating router over token ids")
    p.add_argument("--model", default="smollm2-135m", help="zoo name, local folder or Hub repo id")
    p.add_argument("--experts", type=int, default=8, help="routed experts per layer, D (default 8)")
    p.add_argument("--top-p", type=float, default=0.5, help="fraction of each MLP a token uses (default 0.5)")
    p.add_argument("--calib-text", default="python-docs:train",
                   help="calibration and router-training text: a file, a folder or python-docs:train (default)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="tokens of --calib-text for the expert masks")
    p.add_argument("--train-tokens", type=int, default=16384, help="tokens of --calib-text the router trains on")
    p.add_argument("--router-epochs", type=int, default=8)
    add_eval_args(p)
    add_output_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def _windows(ids, n: int, length: int = 128):
    import torch

    ids = ids[: (min(n, len(ids)) // length) * length]
    return [{"input_ids": w[None], "attention_mask": torch.ones(1, length, dtype=torch.long)} for w in ids.view(-1, length)]


def run(args) -> None:
    from hf_ext.eval import perplexity, tokenize
    from hf_ext.hub import render_card, save_converted
    from hf_ext.moe import MoEError, activation_stats, convert_to_pregated_moe, expert_masks
    from hf_ext.moe.router import overlap_scores, target_accuracy, train_router
    from hf_ext.zoo import HUB_IDS, load_corpus

    if args.experts < 2:
        raise MoEError(f"--experts {args.experts}: give at least 2 routed experts")
    if not 0 < args.top_p <= 1:
        raise MoEError(f"--top-p {args.top_p} must lie in (0, 1]")
    eval_text, model, tok = load_source(args)
    ids = tokenize(tok, load_corpus(args.calib_text), args.calib_tokens + args.train_tokens)
    calib = _windows(ids, args.calib_tokens)
    train = _windows(ids[args.calib_tokens:], args.train_tokens) or calib
    if len(calib) < 1:
        raise MoEError(f"--calib-text gave {len(ids)} tokens, fewer than one 128-token window; give more text")
    masks = expert_masks(activation_stats(model, calib, clusters=args.experts), args.top_p)   # k-means clusters
    moe = convert_to_pregated_moe(model, masks)
    scores = overlap_scores(model, masks, train)
    log = train_router(moe, train, scores, epochs=args.router_epochs)
    ev = dict(max_tokens=args.max_tokens, window=args.window)
    result = {"model": args.model, "experts": args.experts, "top_p": args.top_p,
              "active_mlp_fraction": moe.config.active_mlp_fraction,
              "ppl_source": perplexity(model, tok, eval_text, **ev)["ppl"],
              "ppl_converted": perplexity(moe, tok, eval_text, **ev)["ppl"],
              "router_train_tokens": sum(int(b["attention_mask"].sum()) for b in train),
              "router_target_accuracy": target_accuracy(moe, train, scores),
              "router_final_loss": log["loss_curve"][-1]}
    card = render_card("moe", base_model=HUB_IDS.get(args.model, args.model), metrics=result,
                       base_model_relation="finetune", tags=["moe", "read-me"],
                       model_name=f"{args.model} -> pre-gated MoE ({args.experts} experts, top-p {args.top_p})",
                       args=args)
    out = save_converted(moe, args.out, tokenizer=tok, card=card, overwrite=args.overwrite, report=result)
    url = maybe_push(args, out)
    if url:
        result["pushed"] = url
    emit({**result, "out": str(out)}, args.json)
