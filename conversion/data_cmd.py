"""`hf-ext data tokens|images|info`: write and inspect hf-ext stores (memory-mapped shards)."""
from __future__ import annotations

import sys

from .common import add_command, add_group, add_json_arg, emit


def add_parser(sub) -> None:
    data = add_group(sub, "data", "fast data path: write stores of token windows or images", dest="data_cmd")
    add_command(data, "tokens", "tokenize text files into fixed windows of token ids", tokens_arguments, run_tokens)
    add_command(data, "images", "images at a fixed size: raw uint8 HWC or re-encoded", images_arguments, run_images)
    add_command(data, "info", "describe a store: fields, records, bytes, provenance",
                lambda p: (p.add_argument("store"), add_json_arg(p)), run_info)


def tokens_arguments(p) -> None:
    p.add_argument("--text-files", nargs="+", required=True,
                   help="files or folders (python-docs:train and python-docs:eval work too)")
    p.add_argument("--tokenizer", required=True, help="zoo name (smollm2-135m), local folder or Hub repo id")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                   help="id storage (default auto: uint16 when the vocabulary fits)")
    _common(p)


def images_arguments(p) -> None:
    p.add_argument("--dir", required=True, help="a folder of images; sub-folders are classes, as in ImageFolder")
    p.add_argument("--size", type=int, default=64, help="side in pixels (shorter side resized, centre crop)")
    p.add_argument("--encode", choices=["none", "jpeg", "png"], default="none",
                   help="store raw pixels (default) or re-encoded bytes, decoded when read")
    _common(p)


def _common(p) -> None:
    p.add_argument("--out", required=True, help="store folder; an interrupted write to it resumes")
    p.add_argument("--overwrite", action="store_true", help="replace a complete store at --out")
    p.add_argument("--append", action="store_true", help="add records to a complete store with the same settings")
    p.add_argument("--shard-records", type=int, default=None, help="records per shard (default ~256 MiB)")
    add_json_arg(p)


def _summary(index: dict, out: str) -> dict:
    return {"records": index["count"], "shards": len(index["shards"]),
            "bytes": sum(s["bytes"] for s in index["shards"]), "out": str(out)}


def run_tokens(args) -> None:
    from hf_ext.data import write_token_windows
    from hf_ext.zoo import corpus_files

    files = [f for spec in args.text_files for f in corpus_files(spec)]
    index = write_token_windows(files, args.tokenizer, args.window, args.out, dtype=args.dtype,
                                shard_records=args.shard_records, overwrite=args.overwrite, append=args.append)
    s = _summary(index, args.out)
    emit({"windows": s["records"], "tokens": s["records"] * args.window, "bytes": s["bytes"],
          "dtype": index["fields"][0]["dtype"], "shards": s["shards"], "out": s["out"]}, args.json)


def run_images(args) -> None:
    from hf_ext.data import write_images

    index = write_images(args.dir, args.size, args.out, encode=None if args.encode == "none" else args.encode,
                         shard_records=args.shard_records, overwrite=args.overwrite, append=args.append)
    s = _summary(index, args.out)
    emit({"images": s["records"], "classes": len(index["provenance"]["classes"]), "bytes": s["bytes"],
          "shards": s["shards"], "out": s["out"]}, args.json)


def run_info(args) -> None:
    from hf_ext.data.store import read_index

    index = read_index(args.store)
    fields = ", ".join(f"{f['name']}:{'bytes' if f['variable'] else f['dtype']}{list(f['shape'])}"
                       for f in index["fields"])
    prov = {k: v for k, v in index["provenance"].items() if k != "sources"}
    print(f"sources: {len(index['provenance'].get('sources', []))} files", file=sys.stderr)
    emit({**_summary(index, args.store), "complete": index["complete"], "fields": fields, **prov}, args.json)
