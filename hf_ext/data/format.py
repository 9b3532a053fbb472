"""The shard file: one page-aligned, memory-mappable file of fixed-size records (FFCV's ``.beton`` idea).

Paper: FFCV: Accelerating Training by Removing Data Bottlenecks (Leclerc et al., CVPR 2023),
https://arxiv.org/abs/2306.12517

Layout (all integers little-endian)::

    0            b"HFEXTSHD"  magic (8 bytes)
    8            uint32       format version (1)
    12           uint32       n = byte length of the JSON header
    16           n bytes      JSON header, then spaces up to data_offset
    data_offset  count x record_bytes     the records, packed; data_offset is a multiple of 4096
    blob_offset  blob_bytes               bytes of variable-length fields (only if there are any)
    file_bytes   end of file

The JSON header holds ``fields`` (name, dtype, per-record shape, variable), ``record_bytes``, ``count``,
``page_size`` (the read unit of the QUASI_RANDOM order), the offsets above, and ``provenance`` (tokenizer
or model, hook point, source files and their SHA-256). A record is the concatenation of its fields'
bytes in header order. A variable-length field (encoded images) stores ``(offset, length)`` as two
uint64 in the record and its bytes in the blob region.

A writer reserves the header's room up front (provenance is known before the data), writes records,
then fills the header in; the file only appears under its final name when it is complete.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import HfExtError

MAGIC = b"HFEXTSHD"
VERSION = 1
ALIGN = 4096                    # the data region starts on an OS page
DEFAULT_PAGE_SIZE = 1 << 23     # 8 MiB read pages for QUASI_RANDOM, FFCV's writer default
# logical dtype -> (numpy storage dtype, torch dtype). bfloat16 has no numpy dtype: stored as uint16 bits.
DTYPES = {
    "uint8": ("<u1", torch.uint8), "int8": ("<i1", torch.int8), "uint16": ("<u2", torch.uint16),
    "int16": ("<i2", torch.int16), "uint32": ("<u4", torch.uint32), "int32": ("<i4", torch.int32),
    "int64": ("<i8", torch.int64), "float16": ("<f2", torch.float16), "bfloat16": ("<u2", torch.bfloat16),
    "float32": ("<f4", torch.float32), "float64": ("<f8", torch.float64),
}


class DataFormatError(HfExtError, ValueError):
    """A shard or store that is malformed, truncated, of an unknown version, or not what the reader wants."""


@dataclass(frozen=True)
class Field:
    """One column of a record. ``variable=True``: a byte string of any length (shape and dtype ignored)."""

    name: str
    dtype: str = "uint8"
    shape: tuple[int, ...] = ()
    variable: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise DataFormatError(f"field '{self.name}': dtype '{self.dtype}' is not supported; use one of "
                                  f"{', '.join(DTYPES)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 1 for s in self.shape):
            raise DataFormatError(f"field '{self.name}': shape {self.shape} has a dimension < 1")

    @property
    def nbytes(self) -> int:
        """Bytes this field takes inside a record."""
        if self.variable:
            return 16
        return int(np.dtype(DTYPES[self.dtype][0]).itemsize * np.prod(self.shape, dtype=np.int64))

    @classmethod
    def from_dict(cls, d: dict) -> Field:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), d.get("variable", False))


def fields_from_header(header: dict) -> list[Field]:
    return [Field.from_dict(f) for f in header["fields"]]


def record_bytes(fields: list[Field]) -> int:
    return sum(f.nbytes for f in fields)


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def _encode_header(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True).encode()


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a shard, after checking magic, version and size (a truncated file is an error)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        pre = f.read(16)
        if len(pre) < 16 or pre[:8] != MAGIC:
            raise DataFormatError(f"{path} is not an hf-ext shard (bad magic); write it with hf_ext.data")
        version, n = struct.unpack("<II", pre[8:])
        if version != VERSION:
            raise DataFormatError(f"{path} has format version {version}; this hf-ext reads version {VERSION}. "
                                  "Upgrade hf-ext, or rewrite the store with this version")
        header = json.loads(f.read(n))
    if size != header["file_bytes"]:
        raise DataFormatError(f"{path} is truncated ({size} of {header['file_bytes']} bytes); delete it and rerun "
                              "the same write command to resume from the last complete shard")
    return header


class ShardWriter:
    """Append records to one shard; ``close()`` writes the header and renames the file into place.

    Example:
        >>> w = ShardWriter("s.hfd", [Field("input_ids", "uint16", (4,))])  # doctest: +SKIP
        >>> w.write_batch({"input_ids": np.arange(8).reshape(2, 4)}); w.close()  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, fields: list[Field], provenance: dict | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE):
        if not fields or len({f.name for f in fields}) != len(fields):
            raise DataFormatError(f"fields {[f.name for f in fields]}: give at least one, with distinct names")
        self.path, self.fields, self.count = Path(path), list(fields), 0
        self.record_bytes = record_bytes(fields)
        self.header = {"format": "hf-ext-shard", "version": VERSION, "fields": [asdict(f) for f in fields],
                       "record_bytes": self.record_bytes, "page_size": int(page_size),
                       "provenance": provenance or {}}
        big = {k: 10 ** 18 for k in ("count", "data_offset", "blob_offset", "blob_bytes", "file_bytes")}
        self.data_offset = _align(16 + len(_encode_header({**self.header, **big})))
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._f = open(self.tmp, "wb")
        self._f.seek(self.data_offset)
        self._blob = open(self.tmp.with_suffix(".blob"), "w+b") if any(f.variable for f in fields) else None
        self._blob_bytes = 0

    def write_batch(self, batch: dict) -> None:
        """Append ``len(batch[name])`` records; fixed fields are arrays (N, *shape), variable ones lists of bytes."""
        n = {len(batch[f.name]) if f.name in batch else -1 for f in self.fields}
        if -1 in n or len(n) != 1:
            raise DataFormatError(f"a batch needs every field {[f.name for f in self.fields]} with equal lengths")
        n = n.pop()
        rec = np.empty((n, self.record_bytes), np.uint8)
        col = 0
        for f in self.fields:
            if f.variable:
                lens = np.array([len(b) for b in batch[f.name]], np.uint64)
                offs = self._blob_bytes + np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.uint64)
                rec[:, col:col + 16] = np.stack([offs, lens], 1).astype("<u8").view(np.uint8)
                for b in batch[f.name]:
                    self._blob.write(bytes(b))
                self._blob_bytes += int(lens.sum())
            else:
                a = _to_storage(batch[f.name], f.dtype)
                if a.shape[1:] != f.shape:
                    raise DataFormatError(f"field '{f.name}': records of shape {a.shape[1:]}, the store holds {f.shape}")
                rec[:, col:col + f.nbytes] = a.reshape(n, -1).view(np.uint8)
            col += f.nbytes
        self._f.write(rec.tobytes())
        self.count += n

    def close(self) -> dict:
        """Finish the file (header, blob) and move it to its final name. Returns the header."""
        data_end = self.data_offset + self.count * self.record_bytes
        blob_offset = _align(data_end) if self._blob else data_end
        if self._blob:
            self._f.seek(blob_offset)
            self._blob.seek(0)
            while chunk := self._blob.read(1 << 24):
                self._f.write(chunk)
            self._blob.close()
            os.unlink(self._blob.name)
        self.header.update(count=self.count, data_offset=self.data_offset, blob_offset=blob_offset,
                           blob_bytes=self._blob_bytes, file_bytes=blob_offset + self._blob_bytes)
        raw = _encode_header(self.header)
        self._f.truncate(self.header["file_bytes"])
        self._f.seek(0)
        self._f.write(MAGIC + struct.pack("<II", VERSION, len(raw)) + raw)
        self._f.write(b" " * (self.data_offset - 16 - len(raw)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.header

    def abort(self) -> None:
        """Drop the unfinished file."""
        for f in (self._f, self._blob):
            if f is not None:
                f.close()
                Path(f.name).unlink(missing_ok=True)


def _to_storage(a: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        t = torch.as_tensor(a)
        if t.dtype != torch.bfloat16:
            t = t.to(torch.bfloat16)
        return t.contiguous().view(torch.int16).numpy().view("<u2")
    if isinstance(a, torch.Tensor):
        a = (a.float() if a.dtype == torch.bfloat16 else a).detach().cpu().numpy()
    a = np.asarray(a)
    store = np.dtype(DTYPES[dtype][0])
    if np.issubdtype(store, np.integer) and a.dtype.kind in "iu":
        info = np.iinfo(store)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise DataFormatError(f"values in [{a.min()}, {a.max()}] do not fit {dtype}; use a wider dtype")
    return np.ascontiguousarray(a, dtype=store)


class Shard:
    """Read-only, memory-mapped view of one shard file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header = read_header(self.path)
        self.fields = fields_from_header(self.header)
        self.count, self.record_bytes = self.header["count"], self.header["record_bytes"]
        n = max(self.count * self.record_bytes, 1)  # np.memmap refuses an empty map
        self._records = np.memmap(self.path, np.uint8, "r", self.header["data_offset"], (n,))
        self.records = self._records[: self.count * self.record_bytes].reshape(self.count, self.record_bytes)
        ends = np.cumsum([f.nbytes for f in self.fields]).tolist()
        self._columns = [(f, e - f.nbytes, e) for f, e in zip(self.fields, ends)]  # byte range of each field
        # one opaque item per record, so a gather is one memcpy per record rather than a byte-wise take
        self._items = self._records[: self.count * self.record_bytes].view(np.dtype((np.void, self.record_bytes)))
        self.blob = (np.memmap(self.path, np.uint8, "r", self.header["blob_offset"], (self.header["blob_bytes"],))
                     if self.header["blob_bytes"] else None)

    def __len__(self) -> int:
        return self.count

    def pages(self) -> np.ndarray:
        """The read page (``page_size`` bytes of the data region) where each record starts: (count,) int64."""
        return np.arange(self.count, dtype=np.int64) * self.record_bytes // self.header["page_size"]

    def gather(self, idx: np.ndarray) -> dict:
        """Records ``idx`` as ``{field: tensor (len(idx), *shape)}``; variable fields give a list of uint8 tensors."""
        if idx.size and idx[-1] - idx[0] + 1 == idx.size and np.all(np.diff(idx) == 1):
            raw = np.array(self.records[idx[0]:idx[-1] + 1])        # a contiguous run: one memcpy
        else:
            raw = self._items[idx].view(np.uint8).reshape(idx.size, self.record_bytes)
        out = {}
        for f, lo, hi in self._columns:
            part = raw[:, lo:hi] if len(self._columns) > 1 else raw
            if f.variable:
                ol = np.ascontiguousarray(part).view("<u8")
                out[f.name] = [torch.from_numpy(np.array(self.blob[o:o + n])) for o, n in ol.tolist()]
                continue
            arr = np.ascontiguousarray(part).view(DTYPES[f.dtype][0]).reshape(len(raw), *f.shape)
            t = torch.from_numpy(arr)
            out[f.name] = t.view(torch.bfloat16) if f.dtype == "bfloat16" else t
        return out
