"""HF ``datasets`` in and out, and shards from object storage through litdata's downloaders.

- ``from_hf_dataset(ds, out)``: any ``datasets.Dataset`` whose columns have a fixed shape per row
  (numbers, fixed-length lists, arrays) or are bytes/strings (stored variable-length) becomes a store.
- ``to_hf_dataset(root)``: a store becomes a ``datasets.Dataset`` (bfloat16 widens to float32: Arrow has no
  bfloat16), ready for ``push_to_hub``.
- ``fetch_store(remote, cache_dir)``: a store kept in object storage (``s3://``, ``gs://``, ``azure://``,
  ``hf://``, or a local path) is copied shard by shard into ``cache_dir`` with litdata's downloaders, and
  the usual readers memory-map it there.

Why litdata and not mosaicml-streaming: we only need "fetch this file atomically into a cache", and
litdata exposes exactly that per URL scheme (``get_downloader``), with light dependencies and no pin on
numpy. mosaicml-streaming's downloader comes with its own shard format, and it pins numpy < 2.2 and
pulls in transformers, matplotlib and the OCI SDK. Data bigger than one machine's disk should stay in
the streaming library's own format; hf-ext stores are meant to fit on the local disk of each node.

Example:
    >>> from hf_ext.data import fetch_store, ShardedDataset
    >>> ds = ShardedDataset(fetch_store("s3://bucket/tokens", "/tmp/cache"))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingAssetError
from .format import DTYPES, DataFormatError, Field
from .store import INDEX, ShardedDataset, StoreWriter, read_index


def _declared_dtype(feature) -> str | None:
    """The element dtype a ``datasets`` feature declares (numpy formatting may widen it, e.g. uint16 -> int64)."""
    while hasattr(feature, "feature"):  # List / Sequence / LargeList
        feature = feature.feature
    return getattr(feature, "dtype", None)


def _field_of(name: str, a: np.ndarray, feature=None) -> Field:
    declared = _declared_dtype(feature)
    if a.dtype == object or a.dtype.kind in "SUO" or declared in ("string", "large_string", "binary", "large_binary"):
        return Field(name, variable=True)
    dtype = declared if declared in DTYPES else a.dtype.name
    return Field(name, "uint8" if dtype == "bool" else dtype, a.shape[1:])


def _as_records(field: Field, a) -> object:
    if field.variable:
        return [x.encode() if isinstance(x, str) else bytes(x) for x in a]
    a = np.asarray(a)
    if a.dtype == object:
        raise DataFormatError(f"column '{field.name}' has rows of different shapes; a store holds fixed-size "
                              "records (pack text into windows with `hf-ext data tokens`)")
    return a


def from_hf_dataset(ds, out: str | os.PathLike, columns: list[str] | None = None, batch_size: int = 1024,
                    overwrite: bool = False) -> dict:
    """Write a ``datasets.Dataset`` (or the named ``columns``) into a store at ``out``. Returns the index."""
    columns = columns or list(ds.column_names)
    unknown = sorted(set(columns) - set(ds.column_names))
    if unknown:
        raise DataFormatError(f"columns {unknown} are not in the dataset; it has {ds.column_names}")
    view = ds.with_format("numpy", columns=columns)
    first = view[:1]
    fields = [_field_of(c, np.asarray(first[c]), ds.features.get(c)) for c in columns]
    provenance = {"kind": "hf-datasets", "dataset": ds.info.dataset_name, "split": str(ds.split),
                  "fingerprint": ds._fingerprint}
    writer = StoreWriter(out, fields, provenance, overwrite=overwrite)
    with writer:
        for i in range(writer.resume_skip, len(ds), batch_size):
            rows = view[i:i + batch_size]
            writer.write_batch({f.name: _as_records(f, rows[f.name]) for f in fields})
    return writer.index


def _features(fields: list[Field]):
    from datasets import Array2D, Array3D, Features, List, Value

    out = {}
    for f in fields:
        dtype = "float32" if f.dtype == "bfloat16" else f.dtype
        if f.variable:
            out[f.name] = Value("binary")
        elif len(f.shape) == 0:
            out[f.name] = Value(dtype)
        elif len(f.shape) == 1:
            out[f.name] = List(Value(dtype), length=f.shape[0])
        elif len(f.shape) in (2, 3):
            out[f.name] = (Array2D if len(f.shape) == 2 else Array3D)(shape=f.shape, dtype=dtype)
        else:
            raise DataFormatError(f"field '{f.name}' has {len(f.shape)} dimensions; Arrow export takes up to 3")
    return Features(out)


def _records(root: str, batch: int = 1024):
    ds = ShardedDataset(root)
    for i in range(0, len(ds), batch):
        b = ds.__getitems__(np.arange(i, min(i + batch, len(ds))))
        cols = {k: v if isinstance(v, list) else (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                for k, v in b.items()}
        for j in range(len(next(iter(cols.values())))):
            yield {k: (bytes(v[j].numpy()) if isinstance(v, list) else v[j]) for k, v in cols.items()}


def to_hf_dataset(root: str | os.PathLike, cache_dir: str | None = None):
    """A store as a ``datasets.Dataset`` (Arrow-backed, cached by ``datasets`` under ``cache_dir``)."""
    from datasets import Dataset

    fields = [Field.from_dict(f) for f in read_index(root)["fields"]]
    ShardedDataset(root)  # an incomplete or corrupt store fails here, with the reader's message
    return Dataset.from_generator(_records, features=_features(fields), gen_kwargs={"root": str(root)},
                                  cache_dir=cache_dir)


def fetch_store(remote: str, cache_dir: str | os.PathLike, storage_options: dict | None = None,
                workers: int = 8) -> Path:
    """Copy a store from ``remote`` (object storage URL or path) into ``cache_dir``; return the local folder.

    Shards already in the cache with the right size are not fetched again. Needs ``pip install litdata``.
    """
    try:
        from litdata.streaming.downloader import get_downloader
    except ImportError as e:
        raise MissingAssetError("fetching a store from object storage needs litdata: pip install litdata") from e
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    remote = str(remote).rstrip("/")
    tmp_index = cache / f".{INDEX}.remote"
    tmp_index.unlink(missing_ok=True)
    try:
        get_downloader(remote, str(cache), [], storage_options).download_file(f"{remote}/{INDEX}", str(tmp_index))
    except (OSError, RuntimeError, ValueError) as e:
        raise DataFormatError(f"could not fetch {remote}/{INDEX} ({e}); check the URL and credentials") from e
    if not tmp_index.is_file():
        raise DataFormatError(f"could not fetch {remote}/{INDEX}; check the URL and credentials")
    index = json.loads(tmp_index.read_text())
    chunks = [{"filename": s["file"], "chunk_bytes": s["bytes"]} for s in index["shards"]]
    dl = get_downloader(remote, str(cache), chunks, storage_options)
    todo = [i for i, s in enumerate(index["shards"])
            if not ((cache / s["file"]).is_file() and (cache / s["file"]).stat().st_size == s["bytes"])]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(dl.download_chunk_from_index, todo))
    missing = [s["file"] for s in index["shards"] if not (cache / s["file"]).is_file()]
    if missing:
        raise DataFormatError(f"shards {missing[:3]} did not arrive from {remote}; another process may hold "
                              "their lock, retry")
    os.replace(tmp_index, cache / INDEX)  # the index last: a half-fetched cache is never a store
    return cache
