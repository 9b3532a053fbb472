"""Small helpers shared by the CLI commands: output, options every convert command takes."""
from __future__ import annotations

import json
import sys


def add_output_args(p, push: bool = True) -> None:
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    if push:
        p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the result to this Hub repo")
        p.add_argument("--endpoint", help="Hub endpoint for --push-to-hub (default: HF_ENDPOINT or huggingface.co)")


def add_eval_args(p, default_text: str = "python-docs:eval") -> None:
    p.add_argument("--eval-text", default=default_text,
                   help="held-out text: a file, a folder, or python-docs:eval (default)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of --eval-text to score (default 4096)")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens (default 512)")


def add_json_arg(p) -> None:
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of the figures")


def load_source(args):
    """Cheap checks first (the --out folder, the eval text), then the source model: ``(text, model, tok)``."""
    from hf_ext.hub import check_output_dir
    from hf_ext.zoo import load_causal_lm, load_corpus

    check_output_dir(args.out, args.overwrite)
    text = load_corpus(args.eval_text)
    model, tok = load_causal_lm(args.model)
    return text, model, tok


def emit(result: dict, as_json: bool) -> None:
    """Human-readable lines, then (with --json) the figures as the last stdout line."""
    for k, v in result.items():
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    if as_json:
        print(json.dumps(result, sort_keys=False))
    sys.stdout.flush()


def maybe_push(args, folder) -> str | None:
    if not getattr(args, "push_to_hub", None):
        return None
    from hf_ext.hub import push

    url = push(folder, args.push_to_hub, endpoint=args.endpoint)
    print(f"pushed {folder} -> {url}", file=sys.stderr)
    return url


def load_diffusers_model(folder):
    """A saved diffusers model (a model folder, or a pipeline folder's transformer), fp32, eval mode."""
    from hf_ext.hub import load_diffusers_folder

    return load_diffusers_folder(folder)
