"""Writers for the three record kinds: token windows, dense rows (activations) and images.

Each returns the store's index (``count``, ``shards``, ``provenance``...) and resumes an interrupted
write of the same settings (see ``hf_ext.data.store``).

Example:
    >>> from hf_ext.data import write_token_windows, ShardedDataset
    >>> write_token_windows(["a.txt", "b.txt"], "smollm2-135m", 512, "tokens/")  # doctest: +SKIP
    >>> ShardedDataset("tokens/")[0]["input_ids"].shape  # doctest: +SKIP
    torch.Size([512])
"""
from __future__ import annotations

import hashlib
import io
import itertools
import shutil
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .format import DEFAULT_PAGE_SIZE, DataFormatError, Field
from .store import StoreWriter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def source_records(files: list[Path]) -> list[dict]:
    """``[{"file", "sha256"}]`` for a store's manifest: which files it was built from, and their hashes."""
    return [{"file": str(f), "sha256": sha256_file(f)} for f in files]


def token_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """uint16 when every id fits (vocab <= 65536), else uint32; an explicit choice that cannot hold the ids fails."""
    limit = {"uint16": 1 << 16, "uint32": 1 << 32}
    if dtype == "auto":
        return "uint16" if vocab_size <= limit["uint16"] else "uint32"
    if dtype not in limit:
        raise DataFormatError(f"token dtype '{dtype}' is not supported; use uint16, uint32 or auto")
    if vocab_size > limit[dtype]:
        raise DataFormatError(f"the tokenizer has {vocab_size} ids, more than {dtype} holds ({limit[dtype]}); "
                              "use --dtype uint32 (or auto)")
    return dtype


def write_token_windows(files: Iterable[str | os.PathLike], tokenizer, window: int, out: str | os.PathLike,
                        dtype: str = "auto", shard_records: int | None = None, overwrite: bool = False,
                        progress: bool = True, append: bool = False) -> dict:
    """Tokenize text files into fixed windows of ``window`` token ids (field ``input_ids``).

    Files are read in the given order and joined by the tokenizer's EOS (when it has one) into one token
    stream, cut into non-overlapping windows; the last partial window is dropped. ``tokenizer``: a
    ``PreTrainedTokenizer`` or anything ``AutoTokenizer`` loads (a zoo name such as ``smollm2-135m`` too).
    """
    from tqdm.auto import tqdm

    files = [Path(f) for f in files]
    if window < 2:
        raise DataFormatError(f"window={window}; a training window needs at least 2 tokens")
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise DataFormatError(f"text files not found: {missing or 'none given'}; check the paths")
    name = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else tokenizer.name_or_path
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from ..zoo import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer))
    dtype = token_dtype(len(tokenizer), dtype)
    provenance = {"kind": "tokens", "tokenizer": str(name), "vocab_size": len(tokenizer), "window": window,
                  "eos_between_files": tokenizer.eos_token_id is not None, "sources": source_records(files)}
    writer = StoreWriter(out, [Field("input_ids", dtype, (window,))], provenance, shard_records, overwrite=overwrite,
                         append=append)
    skip, buf = writer.resume_skip, np.empty(0, np.int64)
    with writer:
        for f in tqdm(files, desc="data: tokenize", unit="file", disable=not progress):
            ids = tokenizer(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            buf = np.concatenate([buf, np.asarray(ids, np.int64)])
            n = len(buf) // window
            if n:
                rows, buf = buf[: n * window].reshape(n, window), buf[n * window:]
                drop = min(skip, n)  # already written by an interrupted run
                skip -= drop
                if n > drop:
                    writer.write_batch({"input_ids": rows[drop:]})
    if writer.index["count"] == 0 and not append:
        shutil.rmtree(out)
        raise DataFormatError(f"the text gives {len(buf)} tokens, fewer than one window of {window}; give more "
                              "text or a smaller --window")
    return writer.index


def write_rows(batches: Iterable, out: str | os.PathLike, dtype: str = "float16", name: str = "x",
               provenance: dict | None = None, shard_records: int | None = None, overwrite: bool = False,
               page_size: int = DEFAULT_PAGE_SIZE, append: bool = False) -> dict:
    """Dense rows (activations): an iterable of (N, D) arrays or tensors, stored as ``dtype``."""
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise DataFormatError("no rows to write; the iterable was empty")
    writer = StoreWriter(out, [Field(name, dtype, tuple(first.shape[1:]))], provenance, shard_records,
                         page_size, overwrite=overwrite, append=append)
    skip = writer.resume_skip  # rows an interrupted run already wrote
    with writer:
        for b in itertools.chain([first], it):
            drop = min(skip, len(b))
            skip -= drop
            if len(b) > drop:
                writer.write_batch({name: b[drop:]})
    return writer.index


def image_files(root: str | os.PathLike) -> tuple[list[Path], list[int] | None, list[str]]:
    """Images under ``root`` (sorted). Sub-folders are classes (as in ImageFolder): then labels too."""
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"image folder '{root}' does not exist; give a folder of images")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataFormatError(f"folder '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    if not classes or any(len(f.relative_to(root).parts) == 1 for f in files):
        return files, None, []
    return files, [classes.index(f.relative_to(root).parts[0]) for f in files], classes


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB, shorter side resized to ``size`` (bicubic), centre-cropped to ``size`` x ``size``: (size, size, 3) uint8."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.array(im.crop((left, top, left + size, top + size)))


def write_images(root: str | os.PathLike, size: int, out: str | os.PathLike, encode: str | None = None,
                 quality: int = 90, batch: int = 64, shard_records: int | None = None, overwrite: bool = False,
                 progress: bool = True, append: bool = False) -> dict:
    """Images at ``size`` x ``size``: raw uint8 HWC (field ``image``), or re-encoded (``encode="jpeg"``/``"png"``,
    a variable-length field decoded by ``decode_images``). Class sub-folders add an int64 ``label``."""
    from PIL import Image
    from tqdm.auto import tqdm

    if size < 1:
        raise DataFormatError(f"size={size}; give a positive image size")
    if encode not in (None, "jpeg", "png"):
        raise DataFormatError(f"encode='{encode}' is not supported; use jpeg, png or none (raw pixels)")
    files, labels, classes = image_files(root)
    fields = [Field("image", "uint8", (size, size, 3), variable=encode is not None)]
    if labels is not None:
        fields.append(Field("label", "int64"))
    provenance = {"kind": "images", "size": size, "encode": encode, "classes": classes, "resize": "shorter side, "
                  "bicubic, centre crop", "sources": [{**s, "file": str(Path(s["file"]).relative_to(root))}
                                                       for s in source_records(files)]}
    writer = StoreWriter(out, fields, provenance, shard_records, overwrite=overwrite, append=append)
    with writer:
        for i in tqdm(range(writer.resume_skip, len(files), batch), desc="data: images", unit="batch", disable=not progress):
            pix = [load_image(f, size) for f in files[i:i + batch]]
            if encode:
                encoded = []
                for p in pix:
                    buf = io.BytesIO()
                    Image.fromarray(p).save(buf, format=encode.upper(), quality=quality)
                    encoded.append(buf.getvalue())
                rec = {"image": encoded}
            else:
                rec = {"image": np.stack(pix)}
            if labels is not None:
                rec["label"] = np.asarray(labels[i:i + batch], np.int64)
            writer.write_batch(rec)
    return writer.index


def decode_images(encoded: list, device=None):
    """Decode a batch of encoded images (uint8 tensors of JPEG/PNG bytes) to (B, H, W, 3) uint8.

    On CUDA, torchvision's nvjpeg decodes the whole batch on the GPU (JPEG only); elsewhere Pillow decodes.
    """
    import torch
    from PIL import Image

    if device is not None and torch.device(device).type == "cuda":
        from torchvision.io import decode_jpeg

        return torch.stack(decode_jpeg(list(encoded), device=device)).permute(0, 2, 3, 1)
    out = []
    for e in encoded:
        with Image.open(io.BytesIO(e.numpy().tobytes())) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))))
    return torch.stack(out)
