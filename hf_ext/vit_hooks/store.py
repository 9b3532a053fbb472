"""Stream one hook point's activations over images or texts into an hf-ext store (``hf_ext.data``).

The store holds one row per token (``cls_only=False``; text padding is skipped) or per image/sequence
(``cls_only=True``: token 0, the CLS token of ViTs and BERT). Rows are memory-mapped shards, written
atomically and resumable (an interrupted run resumes after its last complete shard); the provenance
records the model, hook point, dtype, token choice and the source files with their SHA-256.

Example:
    >>> from hf_ext.vit_hooks import HookedVision, cache_activations, image_batches
    >>> hv = HookedVision(model)
    >>> cache_activations(hv, "blocks.5.hook_resid_post", image_batches(files, 224), "acts/", cls_only=True)  # doctest: +SKIP
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..data import StoreWriter
from ..data.format import Field
from ..data.sources import source_records, load_image
from .families import HookError
from .hooked import HookedVision

FIELD = "activations"


def image_batches(files: list[Path], size: int, batch_size: int = 16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """Normalised (B, 3, size, size) float batches from image files (shorter side resized, centre crop)."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for i in range(0, len(files), batch_size):
        px = torch.stack([torch.from_numpy(load_image(f, size)) for f in files[i:i + batch_size]])  # (B, H, W, 3)
        yield ((px.permute(0, 3, 1, 2).float() / 255 - m) / s,)


def text_batches(tokenizer, texts: Iterable[str], seq_len: int = 128, batch_size: int = 8):
    """Token windows of ``seq_len`` (no padding) as ``{"input_ids", "attention_mask"}`` batches, tokenizing
    lazily (text after the last full batch is dropped)."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
        while len(ids) >= seq_len * batch_size:
            x = torch.tensor(ids[: seq_len * batch_size]).view(batch_size, seq_len)
            ids = ids[seq_len * batch_size:]
            yield {"input_ids": x, "attention_mask": torch.ones_like(x)}


def _stop_layer(hooked: HookedVision, hook_name: str) -> int | None:
    if hook_name.startswith("blocks."):
        nxt = int(hook_name.split(".")[1]) + 1
        return nxt if nxt < hooked.n_layers else None
    return 1 if hook_name == "hook_embed" and hooked.n_layers > 1 else None


def _rows(act: torch.Tensor, cls_only: bool, mask: torch.Tensor | None) -> torch.Tensor:
    if act.dim() == 4:                                                      # (B, T, H, d) -> (B, T, H*d)
        act = act.flatten(-2)
    if act.dim() == 2:                                                      # pooled (B, D), e.g. CLIP's final
        return act
    if cls_only:
        return act[:, 0]                                                    # (B, D)
    return act[mask.bool()] if mask is not None else act.flatten(0, 1)      # (B*T, D)


@torch.no_grad()
def cache_activations(hooked: HookedVision, hook_name: str, batches: Iterable, out: str | os.PathLike,
                      cls_only: bool = False, dtype: str = "float32", model_name: str | None = None,
                      sources: list[Path] | None = None, max_rows: int | None = None,
                      shard_records: int | None = None, overwrite: bool = False, append: bool = False,
                      progress: bool = True) -> dict:
    """Write ``hook_name``'s activations over ``batches`` into a store; returns its index.

    ``append=True`` adds rows to a complete store of the same model, hook and layout (``max_rows`` then
    counts this run's rows). ``batches`` yields model inputs: a tuple of positional tensors (pixels) or a dict of keyword tensors
    (``input_ids``/``attention_mask``; masked tokens are skipped). The forward stops after the hooked block.
    """
    from tqdm.auto import tqdm

    hooked.check_name(hook_name)
    if hook_name.endswith("hook_pattern"):
        raise HookError("hook_pattern is (heads, query, key) per token, not one row of features; store q/k/v/z or "
                        "a residual point instead")
    provenance = {"kind": "activations", "model": model_name or type(hooked.model).__name__, "hook_name": hook_name,
                  "cls_only": cls_only, "family": hooked.family.name,
                  "sources": source_records(sources) if sources else []}
    stop, writer, skip, base = _stop_layer(hooked, hook_name), None, 0, 0
    bar = tqdm(desc=f"cache {hook_name}", unit="row", disable=not progress)
    try:
        for batch in batches:
            args, kwargs = (batch, {}) if isinstance(batch, tuple) else ((), batch)
            _, cache = hooked.run_with_cache(*args, **kwargs, names_filter=hook_name, stop_at_layer=stop)
            rows = _rows(cache[hook_name], cls_only, kwargs.get("attention_mask"))
            if writer is None:
                writer = StoreWriter(out, [Field(FIELD, dtype, (rows.shape[-1],))], provenance, shard_records,
                                     overwrite=overwrite, append=append)
                skip = writer.resume_skip            # rows an interrupted run of this command already stored
                base = writer.count - skip           # rows of the store this run appends to
            drop = min(skip, len(rows))
            skip -= drop
            rows = rows[drop:]
            if max_rows is not None:
                rows = rows[: max(0, max_rows - (writer.count - base))]
            if len(rows):
                writer.write_batch({FIELD: rows.float()})
                bar.update(len(rows))
            if max_rows is not None and writer.count - base >= max_rows:
                break
    except BaseException:
        if writer is not None:
            writer.__exit__(RuntimeError, None, None)  # keep complete shards for a resume, drop the partial one
        raise
    finally:
        bar.close()
    if writer is None:
        raise HookError("no inputs to cache; give at least one image or one window of text")
    return writer.close()
