"""Small helpers shared by the CLI commands: how a command is registered, options read from a config
dataclass, output, and the options every convert command takes.

The shape of every module in ``conversion/``: one function ``add_parser(sub)`` that adds its command(s) under
the subparsers ``sub`` it is given (``convert``'s for converters, ``finetune``'s for fine-tuners, the root's
for the top-level commands ``myopic``, ``data``, ``hooks``, ``sae``, ``eval``, ...), through ``add_group``
and ``add_command``. A command's options are added by its ``arguments(parser)`` function, which
``cli.build_parser`` calls only for the command the command line names: options whose defaults come from a
config dataclass import it (and so torch), and ``hf-ext --help`` or ``hf-ext zoo list`` must not wait for that.
"""
from __future__ import annotations

import dataclasses
import json
import sys


def add_group(sub, name: str, help: str, dest: str):
    """A command with subcommands (``hf-ext myopic synthetic``): returns its subparsers, for ``add_command``."""
    group = sub.add_parser(name, help=help, description=help).add_subparsers(dest=dest, required=True)
    group.registry = sub.registry                     # the lazily filled commands, shared by the whole tree
    return group


def add_command(sub, name: str, help: str, arguments=None, run=None, description: str | None = None):
    """A leaf command under ``sub``: ``arguments(parser)`` adds its options (when the command is chosen, see the
    module docstring), ``run(args)`` runs it."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(func=run)
    sub.registry[p.prog] = (p, arguments)
    return p


def field_type(field: dataclasses.Field):
    """``int``, ``float`` or ``str`` from a field's annotation (``int``, ``float | None``, ...; a string under
    ``from __future__ import annotations``)."""
    names = {"int": int, "float": float, "str": str}
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    kinds = [names[t.strip()] for t in annotation.split("|") if t.strip() in names]
    if len(kinds) != 1:
        raise TypeError(f"cannot tell the type of {field.name}: {annotation}; pass type=")
    return kinds[0]


def add_field(p, config, name: str, *aliases: str, help: str | None = None, **kw) -> None:
    """``--name`` for the field ``name`` of the dataclass ``config``, with the field's default (and type); a bool
    field gives ``--name`` (default False) or ``--no-name`` (default True). ``aliases``: older spellings, kept.

    Example:
        >>> add_field(p, TinySRConfig, "keep_blocks", required=True)      # doctest: +SKIP
    """
    field = {f.name: f for f in dataclasses.fields(config)}[name]
    default = field.default if field.default is not dataclasses.MISSING else (
        None if field.default_factory is dataclasses.MISSING else field.default_factory())   # None: a required field
    flag = "--" + name.replace("_", "-")
    if isinstance(default, bool) and "action" not in kw:
        flag = "--no-" + name.replace("_", "-") if default else flag
        kw["action"] = "store_false" if default else "store_true"
    elif "action" not in kw and "type" not in kw and "choices" not in kw:
        kw["type"] = type(default) if default is not None else field_type(field)
    if kw.get("required"):
        default = None
    elif kw.get("action") not in ("store_true", "store_false") and default is not None:
        help = f"{help + ' ' if help else ''}(default %(default)s)"
    p.add_argument(flag, *aliases, dest=name, default=default, help=help, **kw)
    p.config_classes = getattr(p, "config_classes", set()) | {config}     # for tests/test_cli.py


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
