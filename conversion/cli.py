"""Entry point of the `hf-ext` console script.

    hf-ext convert <technique> ...   upcycle / convert a checkpoint (see `hf-ext convert -h`)
    hf-ext finetune meft ...         fine-tune with a memory-light technique (see `hf-ext finetune -h`)
    hf-ext myopic synthetic|gap      myopic training, measured
    hf-ext data tokens|images|info   fast data path: memory-mapped stores
    hf-ext hooks cache / sae train   activation stores and sparse autoencoders
    hf-ext eval perplexity ...       measure a model
    hf-ext push DIR REPO_ID          upload a folder
    hf-ext zoo list|fetch            offline checkpoints
    hf-ext llamacpp build|where      the pinned llama.cpp build that measures exports

Bad input prints one line, `error: <problem and fix>`, and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from . import (commands, convert_export, convert_icc, convert_mla, convert_moe, convert_tfmq, convert_tinysr, convert_tsdsr, data_cmd, finetune_meft,
               hooks_cmd, myopic_cmd)

CONVERTERS = [convert_mla, convert_export, convert_icc, convert_tfmq, convert_moe, convert_tinysr, convert_tsdsr]
FINETUNERS = [finetune_meft]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ext", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a checkpoint").add_subparsers(dest="technique", required=True)
    for c in CONVERTERS:
        c.add_parser(conv)
    ft = sub.add_parser("finetune", help="fine-tune a model").add_subparsers(dest="technique", required=True)
    for f in FINETUNERS:
        f.add_parser(ft)
    myopic_cmd.add_parsers(sub)
    data_cmd.add_parsers(sub)
    hooks_cmd.add_parsers(sub)
    hooks_cmd.add_sae_parsers(sub)
    commands.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hf_ext.errors import HfExtError

    try:
        args.func(args)
    except HfExtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output folder was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
