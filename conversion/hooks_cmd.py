"""`hf-ext hooks cache` and `hf-ext sae train`: activation stores and sparse autoencoders."""
from __future__ import annotations

from .common import add_json_arg, emit


def add_parsers(sub) -> None:
    hk = sub.add_parser("hooks", help="hook points: cache activations into a store").add_subparsers(
        dest="hooks_cmd", required=True)
    p = hk.add_parser("cache", help="stream one hook point's activations over images or text into a store")
    p.add_argument("--model", required=True, help="timm:<name> (random init), zoo name, local folder or Hub id")
    p.add_argument("--hook", required=True, help="hook point, e.g. blocks.3.hook_resid_post")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of images (sub-folders are fine)")
    src.add_argument("--text-file", help="a text file or folder, or python-docs:train / python-docs:eval")
    p.add_argument("--cls-only", action="store_true", help="store token 0 (CLS) only, one row per input")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--seq-len", type=int, default=128, help="text window in tokens (default 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-rows", type=int, default=None, help="stop after this many rows")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init timm model")
    p.add_argument("--out", required=True, help="store folder; an interrupted run resumes")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--append", action="store_true", help="add rows to a complete store of the same model and hook")
    add_json_arg(p)
    p.set_defaults(func=run_cache)


def run_cache(args) -> None:
    from hf_ext.data.sources import image_files
    from hf_ext.vit_hooks import HookedVision
    from hf_ext.vit_hooks.models import load_hookable
    from hf_ext.vit_hooks.store import cache_activations, image_batches, text_batches
    from hf_ext.zoo import corpus_files

    files = image_files(args.images)[0] if args.images else corpus_files(args.text_file)  # bad paths fail first
    h = load_hookable(args.model, args.seed)
    if (h.modality == "image") != bool(args.images):
        from hf_ext.vit_hooks import HookError

        raise HookError(f"{args.model} is a {h.modality} model; give --{'images' if h.modality == 'image' else 'text-file'}")
    hv = HookedVision(h.model)
    hv.check_name(args.hook)
    if args.images:
        batches = image_batches(files, h.image_size, args.batch_size, h.mean, h.std)
    else:
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in files)
        batches = text_batches(h.tokenizer, texts, args.seq_len, args.batch_size)
    index = cache_activations(hv, args.hook, batches, args.out, cls_only=args.cls_only, dtype=args.dtype,
                              model_name=h.name, sources=files, max_rows=args.max_rows, overwrite=args.overwrite,
                              append=args.append)
    emit({"rows": index["count"], "width": index["fields"][0]["shape"][0], "dtype": args.dtype, "hook": args.hook,
          "model": h.name, "bytes": sum(s["bytes"] for s in index["shards"]), "out": args.out}, args.json)


def add_sae_parsers(sub) -> None:
    sae = sub.add_parser("sae", help="sparse autoencoders on an activation store").add_subparsers(
        dest="sae_cmd", required=True)
    p = sae.add_parser("train", help="train an SAE (standard, top-k or JumpReLU) on a store, save it (SAELens layout)")
    p.add_argument("--store", required=True, help="activation store (`hf-ext hooks cache ... --out STORE`)")
    p.add_argument("--variant", choices=["standard", "topk", "jumprelu"], default="topk")
    p.add_argument("--k", type=int, default=32, help="top-k: active latents per row (default 32)")
    p.add_argument("--expansion", type=int, default=16, help="latents = expansion x width (default 16)")
    p.add_argument("--l1", type=float, default=5.0, help="standard: L1 coefficient (inputs are normalised)")
    p.add_argument("--l0", type=float, default=1.0, help="jumprelu: L0 coefficient")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--total-rows", type=int, default=None, help="training rows (default: one pass over the store)")
    p.add_argument("--eval-store", help="score on this store (default: the store's held-out rows, 1 in 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    add_json_arg(p)
    p.set_defaults(func=run_sae_train)


def run_sae_train(args) -> None:
    from pathlib import Path

    from hf_ext.data import ShardedDataset
    from hf_ext.hub import check_output_dir, render_card, save_converted
    from hf_ext.vit_hooks.sae import SAEConfig
    from hf_ext.vit_hooks.sae_train import SAETrainConfig, evaluate_sae, train_sae

    out = check_output_dir(args.out, args.overwrite)
    ds = ShardedDataset(args.store)                  # a missing or incomplete store fails here
    width = ds.fields[0].shape[0] if ds.fields[0].shape else 0
    cfg = SAEConfig(d_in=width, d_sae=args.expansion * width, architecture=args.variant, k=args.k,
                    l1_coefficient=args.l1, l0_coefficient=args.l0)
    tcfg = SAETrainConfig(batch_size=args.batch_size, total_rows=args.total_rows, lr=args.lr, seed=args.seed,
                          eval_every=0 if args.eval_store else 20)
    sae, log = train_sae(ds, cfg, tcfg)
    metrics = evaluate_sae(sae, args.eval_store) if args.eval_store else log["eval"]
    result = {"variant": args.variant, "d_in": width, "d_sae": cfg.d_sae, "steps": log["steps"],
              "train_rows": log["train_rows"], **{f"eval_{k}": v for k, v in metrics.items()},
              "hook_name": sae.config.hook_name, "model": sae.config.model_name}
    card = render_card("sae", base_model=None, metrics=result, base_model_relation="adapter",
                       tags=["sae", args.variant], model_name=f"{args.variant} SAE on {result['hook_name']}", args=args)
    save_converted(sae, out, card=card, overwrite=args.overwrite,
                   report={**result, "log": {k: v for k, v in log.items() if k != "history"}})
    emit({**result, "out": str(Path(args.out))}, args.json)
