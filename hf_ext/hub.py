"""Save, card, push: the three steps every conversion ends with.

- ``save_converted`` writes a model folder atomically (temp folder, then rename), refusing to replace an
  existing folder unless ``overwrite=True``. A crash never leaves a half-written model that looks whole.
- ``render_card`` fills ``model_cards/<technique>.md`` through huggingface_hub's ``ModelCard`` with
  ``base_model`` metadata and a table of the measured figures.
- ``push`` uploads a folder with ``HfApi.create_repo`` + ``upload_folder``; a failure leaves the local
  folder untouched and says why.

Example:
    >>> from hf_ext.hub import save_converted, render_card, push
    >>> card = render_card("export", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    ...                    metrics={"ppl": 12.1})                            # doctest: +SKIP
    >>> save_converted(model, "out/smollm2", tokenizer=tok, card=card)       # doctest: +SKIP
    >>> push("out/smollm2", "me/smollm2-fp32")                              # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import HubPushError, OutputExistsError

LIBRARY_NAME = "hf-ext"


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any slow work) when ``out`` exists and ``overwrite`` is not set."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder '{out}' already exists; choose another --out or pass --overwrite")
    return out


def save_converted(model, out: str | os.PathLike, *, tokenizer=None, card=None, overwrite: bool = False,
                   report: dict | None = None, safe_serialization: bool = True, extra=None) -> Path:
    """Save ``model`` (+ tokenizer, card, ``hf_ext_report.json``) to ``out`` atomically.

    ``extra(folder)`` may write more files (e.g. calibration factors) into the folder before it goes live.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=safe_serialization)
        if extra is not None:
            extra(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            card.save(tmp / "README.md")
        if report is not None:
            (tmp / "hf_ext_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        if out.exists():  # overwrite=True: swap, so a crash leaves either the old or the new folder
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_diffusers_folder(folder: str | os.PathLike, dtype=None):
    """The diffusers model saved in ``folder`` (a model folder, or a pipeline folder's ``transformer``), in eval
    mode, fp32 by default; the class comes from its ``config.json``."""
    import diffusers
    import torch

    from .errors import HfExtError

    root = Path(folder)
    if (root / "model_index.json").is_file():
        root = root / "transformer"
    cfg = root / "config.json"
    if not cfg.is_file():
        raise HfExtError(f"{folder} holds no diffusers transformer (no config.json or model_index.json); point "
                         "at a saved transformer or pipeline folder")
    name = json.loads(cfg.read_text()).get("_class_name")
    cls = getattr(diffusers, name or "", None)
    if cls is None:
        raise HfExtError(f"{cfg} names no diffusers model class ({name!r}); point at a diffusers transformer")
    return cls.from_pretrained(root, torch_dtype=dtype or torch.float32).eval()


def card_template(technique: str) -> Path:
    import model_cards

    path = Path(model_cards.__file__).parent / f"{technique}.md"
    if not path.is_file():
        raise FileNotFoundError(f"no model card template model_cards/{technique}.md")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_card(technique: str, *, base_model: str | None, metrics: dict, base_model_relation: str = "adapter",
                tags: list[str] | None = None, **template_vars):
    """A ``huggingface_hub.ModelCard`` from ``model_cards/<technique>.md`` with metadata and figures.

    ``base_model_relation`` is one of the Hub's relations: "adapter", "merge", "quantized", "finetune".
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name=LIBRARY_NAME, base_model=base_model,
                         tags=["hf-ext", technique, *(tags or [])], **{"base_model_relation": base_model_relation})
    table = "| figure | value |\n|---|---|\n" + "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in metrics.items())
    return ModelCard.from_template(data, template_path=str(card_template(technique)), metrics_table=table,
                                   metrics=metrics, base_model=base_model, **template_vars)


def push(folder: str | os.PathLike, repo_id: str, *, endpoint: str | None = None, token: str | None = None,
         private: bool = False, commit_message: str | None = None) -> str:
    """Upload ``folder`` to ``repo_id`` (created if needed). Returns the commit URL.

    Raises ``HubPushError`` naming the endpoint and the cause; the local folder is never touched.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").exists() and not any(folder.glob("*.safetensors")):
        raise HubPushError(f"'{folder}' is not a saved model folder (no config.json); push the --out of a convert")
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{endpoint or api.endpoint}/{repo_id}"
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                 commit_message=commit_message or f"Upload {folder.name} with hf-ext")
    except Exception as e:
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubPushError(f"push of {folder} to {where} failed: {cause}. The local folder is intact; "
                           f"check the endpoint and token, then run `hf-ext push {folder} {repo_id}` again.") from e
    return str(getattr(info, "commit_url", info))
