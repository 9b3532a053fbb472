"""A store: a folder of shards plus ``index.json``. Writing is atomic per shard and resumable.

::

    store/
      index.json          {"format": "hf-ext-store", "version": 1, "fields": [...], "provenance": {...},
                           "shards": [{"file": "shard-00000.hfd", "count": .., "bytes": ..}, ...],
                           "count": .., "complete": true}
      shard-00000.hfd     see hf_ext.data.format
      ...

A shard is written under a temporary name and renamed when complete; ``index.json`` is rewritten
atomically after every shard. An interrupted write leaves ``complete: false``: reopening the writer on
the same folder (same fields and provenance) drops any unfinished shard and reports ``writer.count``,
the number of records already safe, so the caller skips that many and goes on. Readers refuse an
incomplete store.

Example:
    >>> from hf_ext.data import Field, StoreWriter, ShardedDataset
    >>> with StoreWriter("acts", [Field("x", "float16", (384,))], {"model": "minilm-l6"}) as w:  # doctest: +SKIP
    ...     w.write_batch({"x": rows})
    >>> ds = ShardedDataset("acts"); ds[0]["x"].shape  # doctest: +SKIP
    torch.Size([384])
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .format import DEFAULT_PAGE_SIZE, VERSION, DataFormatError, Field, Shard, ShardWriter, record_bytes

INDEX = "index.json"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_index(root: str | os.PathLike) -> dict:
    path = Path(root) / INDEX
    if not path.is_file():
        raise DataFormatError(f"{root} is not an hf-ext store (no {INDEX}); write one with `hf-ext data ...`")
    index = json.loads(path.read_text())
    if index.get("format") != "hf-ext-store" or index.get("version") != VERSION:
        raise DataFormatError(f"{path}: format {index.get('format')!r} version {index.get('version')!r}; this "
                              f"hf-ext reads hf-ext-store version {VERSION}. Upgrade hf-ext or rewrite the store")
    return index


class StoreWriter:
    """Write records into a store folder, ``shard_records`` per shard (a context manager).

    Args:
        root: the store folder. If it holds an incomplete store with the same fields and provenance, writing
            resumes after its last complete shard (``self.count`` records are already there).
        fields: the record layout (``hf_ext.data.Field``).
        provenance: what the data came from (tokenizer/model, hook point, source files and hashes).
        shard_records: records per shard; ``None`` picks about 256 MiB per shard.
        overwrite: replace a complete store at ``root``.
        append: add records to a complete store with the same fields and provenance (source lists are merged).
            An interrupted append resumes like any write. ``self.resume_skip`` is the number of records
            this write (not an earlier one it appends to) already stored: skip that many and go on.
    """

    def __init__(self, root: str | os.PathLike, fields: list[Field], provenance: dict | None = None,
                 shard_records: int | None = None, page_size: int = DEFAULT_PAGE_SIZE, overwrite: bool = False,
                 append: bool = False):
        self.root, self.fields, self.page_size = Path(root), list(fields), page_size
        self.provenance = json.loads(json.dumps(provenance or {}))  # as it will read back
        self.shard_records = shard_records or max(1, (256 << 20) // max(1, record_bytes(self.fields)))
        self.index = {"format": "hf-ext-store", "version": VERSION, "fields": [asdict(f) for f in self.fields],
                      "provenance": self.provenance, "shards": [], "count": 0, "complete": False}
        self.index["fields"] = json.loads(json.dumps(self.index["fields"]))
        if (self.root / INDEX).exists():
            self._resume(overwrite, append)
        elif self.root.exists() and any(self.root.iterdir()):
            raise DataFormatError(f"folder {self.root} exists and is not an hf-ext store; choose an empty or new folder")
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".shard-*"):  # an unfinished shard of an interrupted run
            stale.unlink()
        _write_json_atomic(self.root / INDEX, self.index)
        self.resume_skip = self.index["count"] - self.index.get("append_base", 0)
        self._shard: ShardWriter | None = None

    def _resume(self, overwrite: bool, append: bool) -> None:
        old = read_index(self.root)
        if overwrite:
            for s in old["shards"]:
                (self.root / s["file"]).unlink(missing_ok=True)
            return
        if old["complete"] and not append:
            raise DataFormatError(f"store {self.root} already exists and is complete; pass overwrite=True "
                                  "(--overwrite) to replace it, append=True (--append) to add to it, or choose "
                                  "another folder")
        appending = old["complete"] or "append_base" in old
        strip = (lambda p: {k: v for k, v in p.items() if k != "sources"}) if appending else (lambda p: p)
        for key, mine, theirs in (("fields", self.index["fields"], old["fields"]),
                                  ("provenance", strip(self.index["provenance"]), strip(old["provenance"]))):
            if mine != theirs:
                raise DataFormatError(f"store {self.root} holds other {key} ({theirs} vs {mine}); "
                                      f"{'append' if appending else 'resume'} with the same settings, or pass "
                                      "overwrite=True")
        shards = [s for s in old["shards"] if (self.root / s["file"]).is_file()]
        prov = old["provenance"]
        if appending:
            new = [s for s in self.provenance.get("sources", []) if s not in prov.get("sources", [])]
            prov = {**prov, "sources": prov.get("sources", []) + new}
        self.provenance = prov
        self.index.update(shards=shards, count=sum(s["count"] for s in shards), provenance=prov)
        if appending:
            self.index["append_base"] = old.get("append_base", old["count"])

    @property
    def count(self) -> int:
        """Records safely written (complete shards) plus those in the open shard."""
        return self.index["count"] + (self._shard.count if self._shard else 0)

    def write_batch(self, batch: dict) -> None:
        n = len(batch[self.fields[0].name])
        start = 0
        while start < n:
            if self._shard is None:
                name = f"shard-{len(self.index['shards']):05d}.hfd"
                self._shard = ShardWriter(self.root / name, self.fields, self.provenance, self.page_size)
            take = min(n - start, self.shard_records - self._shard.count)
            self._shard.write_batch({k: v[start:start + take] for k, v in batch.items()})
            start += take
            if self._shard.count == self.shard_records:
                self._finish_shard()

    def _finish_shard(self) -> None:
        header = self._shard.close()
        self.index["shards"].append({"file": self._shard.path.name, "count": header["count"],
                                     "bytes": header["file_bytes"]})
        self.index["count"] += header["count"]
        self._shard = None
        _write_json_atomic(self.root / INDEX, self.index)

    def close(self) -> dict:
        """Finish the last shard and mark the store complete. Returns the index."""
        if self._shard is not None and self._shard.count:
            self._finish_shard()
        elif self._shard is not None:
            self._shard.abort()
            self._shard = None
        self.index["complete"] = True
        self.index.pop("append_base", None)
        _write_json_atomic(self.root / INDEX, self.index)
        return self.index

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._shard is not None:  # keep the complete shards for a resume; drop the partial one
            self._shard.abort()


class ShardedDataset(torch.utils.data.Dataset):
    """A store as a map-style ``torch`` Dataset: memory-mapped, random access by index.

    ``ds[i]`` is ``{field: tensor}`` for one record; ``ds.__getitems__(indices)`` gathers a whole batch in
    one pass (``DataLoader`` uses it), so pass ``collate_fn=ShardedDataset.collate``. Tensors keep the
    stored dtype (uint16 token ids stay uint16 until the device; see ``hf_ext.data.Loader``).

    Args:
        root: the store folder.
        fields / dtypes / shapes: optional expectations ``{name: dtype}``/``{name: shape}``; a mismatch is an
            error that names both (for example an SAE reading activations of another width).
        with_index: add an ``"index"`` field with each record's global index.
    """

    def __init__(self, root: str | os.PathLike, dtypes: dict | None = None, shapes: dict | None = None,
                 with_index: bool = False):
        self.root, self.with_index = Path(root), with_index
        self.index = read_index(self.root)
        if not self.index["complete"]:
            raise DataFormatError(f"store {root} is incomplete ({self.index['count']} records in "
                                  f"{len(self.index['shards'])} shards; the write was interrupted). Rerun the "
                                  "same write command to resume it")
        self.fields = [Field.from_dict(f) for f in self.index["fields"]]
        by_name = {f.name: f for f in self.fields}
        for name, want in (dtypes or {}).items():
            if name not in by_name or by_name[name].dtype != want:
                raise DataFormatError(f"store {root}: field '{name}' is "
                                      f"{by_name[name].dtype if name in by_name else 'missing'}, expected {want}")
        for name, want in (shapes or {}).items():
            if name not in by_name or by_name[name].shape != tuple(want):
                raise DataFormatError(f"store {root}: field '{name}' has shape "
                                      f"{by_name[name].shape if name in by_name else 'missing'}, expected {tuple(want)}")
        self.shards = []
        for s in self.index["shards"]:
            shard = Shard(self.root / s["file"])
            if shard.count != s["count"]:
                raise DataFormatError(f"{shard.path} holds {shard.count} records, the index says {s['count']}; "
                                      "the store is corrupt, rewrite it")
            self.shards.append(shard)
        self.offsets = np.cumsum([0] + [s.count for s in self.shards])

    @property
    def provenance(self) -> dict:
        return self.index["provenance"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def pages(self) -> np.ndarray:
        """Global read-page id of every record (for the QUASI_RANDOM order): (N,) int64."""
        out, base = [], 0
        for s in self.shards:
            p = s.pages()
            out.append(p + base)
            base += int(p[-1]) + 1 if len(p) else 0
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def __getitems__(self, indices) -> dict:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a store of {len(self)} records")
        if len(self.shards) == 1:
            out = self.shards[0].gather(idx)
        elif idx.size < 2 or np.all(idx[1:] >= idx[:-1]):  # sorted (the Loader's batches): split in place
            cuts = np.searchsorted(idx, self.offsets[1:-1])
            parts = [self.shards[k].gather(part - self.offsets[k])
                     for k, part in enumerate(np.split(idx, cuts)) if part.size]
            out = parts[0] if len(parts) == 1 else self._concat(parts)
        else:  # any order: gather sorted, then put the records back in the order asked for
            perm = np.argsort(idx, kind="stable")
            out = self.__getitems__(idx[perm])
            out.pop("index", None)
            inv = np.empty_like(perm)
            inv[perm] = np.arange(perm.size)
            out = {k: [v[i] for i in inv.tolist()] if isinstance(v, list) else v[torch.from_numpy(inv)]
                   for k, v in out.items()}
        if self.with_index:
            out["index"] = torch.from_numpy(idx)
        return out

    def _concat(self, parts: list[dict]) -> dict:
        return {f.name: sum((p[f.name] for p in parts), []) if f.variable else torch.cat([p[f.name] for p in parts])
                for f in self.fields}

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([int(i)]).items()}

    @staticmethod
    def collate(batch):
        """``DataLoader`` collate for batches from ``__getitems__`` (already stacked)."""
        return batch
