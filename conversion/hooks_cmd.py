"""`hf-ext hooks cache`: stream a hook point's activations into a store (`hf-ext sae train` reads it)."""
from __future__ import annotations

from .common import add_command, add_group, add_json_arg, emit


def add_parser(sub) -> None:
    hk = add_group(sub, "hooks", "hook points: cache activations into a store", dest="hooks_cmd")
    add_command(hk, "cache", "stream one hook point's activations over images or text into a store", cache_arguments,
                run_cache)


def cache_arguments(p) -> None:
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


def run_cache(args) -> None:
    from hf_ext.data.sources import image_files
    from hf_ext.vit_hooks import HookedVision
    from hf_ext.vit_hooks.loading import load_hookable
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
