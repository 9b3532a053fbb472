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

Bad input prints one line, `error: <problem and fix>`, and exits with status 2. A command's options are
built (and what they need imported) only when the command line names it: see ``conversion/common.py``.
"""
from __future__ import annotations

import argparse
import sys

from . import (commands, convert_export, convert_icc, convert_mla, convert_moe, convert_tfmq, convert_tinysr,
               convert_tsdsr, data_cmd, finetune_meft, hooks_cmd, myopic_cmd, sae_cmd)
from .common import add_group

CONVERTERS = [convert_mla, convert_export, convert_icc, convert_tfmq, convert_moe, convert_tinysr, convert_tsdsr]
FINETUNERS = [finetune_meft]
TOP_LEVEL = [myopic_cmd, data_cmd, hooks_cmd, sae_cmd, commands]


def build_parser(argv: list[str] | None = None, every: bool = False) -> argparse.ArgumentParser:
    """The ``hf-ext`` parser. Only the command that ``argv`` names (default ``sys.argv[1:]``) gets its options,
    or every command with ``every=True`` (tests). ``parser.commands``: {prog: (parser, add its options)}."""
    parser = argparse.ArgumentParser(prog="hf-ext", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.registry = parser.commands = {}
    conv = add_group(sub, "convert", "convert a checkpoint", dest="technique")
    for c in CONVERTERS:
        c.add_parser(conv)
    ft = add_group(sub, "finetune", "fine-tune a model", dest="technique")
    for f in FINETUNERS:
        f.add_parser(ft)
    for t in TOP_LEVEL:
        t.add_parser(sub)
    chosen = set(parser.commands) if every else {named_command(parser, sys.argv[1:] if argv is None else argv)}
    for prog in chosen & set(parser.commands):
        p, arguments = parser.commands[prog]
        if arguments is not None:
            arguments(p)
    return parser


def named_command(parser, argv: list[str]) -> str | None:
    """The prog of the leaf command that ``argv`` starts with (``hf-ext convert mla``), if any."""
    prog = parser.prog
    for word in argv:
        if word.startswith("-") or not any(k == f"{prog} {word}" or k.startswith(f"{prog} {word} ") for k in parser.commands):
            break
        prog = f"{prog} {word}"
    return prog if prog in parser.commands else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
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
