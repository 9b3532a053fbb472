"""Reading an SAE's rows from an hf-ext activation store, and ``evaluate_sae`` (explained variance, L0, dead
latents) on them.

Held-out rows: record ``i`` of the store is an eval row when ``i % eval_every == 0`` (``split_indices``);
``train_sae`` never trains on it.
"""
from __future__ import annotations

import numpy as np
import torch

from ...data import DataFormatError, ShardedDataset
from .configuration_sae import SAEError
from .modeling_sae import SparseAutoencoder


def open_activations(store, d_in: int, field: str = "activations") -> ShardedDataset:
    """The store, after checking it holds ``field`` rows of width ``d_in`` (else a ``DataFormatError``)."""
    ds = store if isinstance(store, ShardedDataset) else ShardedDataset(store)
    by_name = {f.name: f for f in ds.fields}
    if field not in by_name:
        raise DataFormatError(f"store {ds.root} has no field '{field}' (it has {sorted(by_name)}); pass "
                              f"SAETrainConfig(field=...) or write it with write_rows(..., name='{field}')")
    shape = by_name[field].shape
    if by_name[field].variable or len(shape) != 1 or shape[0] != d_in:
        raise DataFormatError(f"store {ds.root} holds {field} of shape {shape}, the SAE expects d_in={d_in}; "
                              f"set SAEConfig(d_in={shape[0] if len(shape) == 1 else '...'}) or point at a store "
                              f"of a hook point of width {d_in} (rows of shape ({d_in},))")
    return ds


def split_indices(n: int, eval_every: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) record indices: eval = {i : i % eval_every == 0}; disjoint, together range(n)."""
    idx = np.arange(n, dtype=np.int64)
    if eval_every == 0:
        return idx, idx[:0]
    held = idx % eval_every == 0
    return idx[~held], idx[held]


def read_rows(ds: ShardedDataset, indices, field: str, chunk: int = 65536):
    """The ``field`` rows of records ``indices`` as float32 tensors, ``chunk`` records at a time."""
    for s in range(0, len(indices), chunk):
        yield ds.__getitems__(np.sort(indices[s:s + chunk]))[field].float()


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, rows_or_store, field: str = "activations", indices=None,
                 batch_size: int = 4096) -> dict:
    """Reconstruction and sparsity on rows: a tensor (N, d_in), a store path or a ShardedDataset (``indices``
    picks records).

    Returns ``explained_variance`` = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2, ``l0`` = mean active
    latents per row, ``dead_fraction`` = share of latents that never fire on these rows, ``mse`` = mean
    squared error per element, ``rows``.
    """
    if isinstance(rows_or_store, torch.Tensor):
        chunks = rows_or_store.reshape(-1, rows_or_store.shape[-1]).float().split(batch_size)
    else:
        ds = open_activations(rows_or_store, sae.config.d_in, field)
        idx = np.arange(len(ds)) if indices is None else np.asarray(indices, np.int64)
        chunks = (c for big in read_rows(ds, idx, field) for c in big.split(batch_size))
    dev = sae.W_enc.device
    n, sse, s1, s2, active = 0, 0.0, 0.0, 0.0, 0.0
    fired = torch.zeros(sae.config.d_sae, dtype=torch.bool, device=dev)
    for x in chunks:
        x = x.to(dev)                                                     # (B, d_in)
        f = sae.encode(x)                                                 # (B, d_sae)
        x_hat = sae.decode(f).float()
        xd = x.double()
        sse += float((x_hat.double() - xd).pow(2).sum())
        s1, s2 = s1 + xd.sum(0), s2 + float(xd.pow(2).sum())
        active += float((f != 0).sum())
        fired |= (f != 0).any(0)
        n += len(x)
    if n == 0:
        raise SAEError("no rows to evaluate; give at least one row (is eval_every 0 or the store empty?)")
    sst = s2 - float((s1 * s1).sum()) / n                                 # sum ||x - mean||^2
    return {"explained_variance": 1 - sse / max(sst, 1e-30), "l0": active / n,
            "dead_fraction": float((~fired).float().mean()), "mse": sse / (n * sae.config.d_in), "rows": n}


__all__ = ["evaluate_sae", "open_activations", "read_rows", "split_indices"]
