"""Traversal orders: which record each step reads. Pure index math, deterministic per (seed, epoch).

- ``sequential``: 0, 1, 2, ... (evaluation, and the fastest read).
- ``random``: a full permutation per epoch.
- ``quasi_random`` (after FFCV's QUASI_RANDOM): shuffle the read pages, then shuffle records only within
  a window of ``window_pages`` consecutive pages of that shuffled list. Every record is read once per
  epoch, and at any moment reads hit a few pages (8 x 8 MiB by default), so the OS page cache and
  read-ahead keep working even when the data is far bigger than RAM. FFCV instead keeps a buffer of
  2 x batch_size pages and draws each record from a random page of it; a fixed window is simpler to
  reproduce (a pure function of seed and epoch) and gives the same locality.

Ranks: every rank computes the same global order and takes ``order[rank::world_size]``, so the ranks are
disjoint and, together, read every record exactly once. ``drop_last`` trims the order to a multiple of
``world_size * batch_size`` first (equal step counts for DDP); the records it drops change every epoch.

Example:
    >>> from hf_ext.data.order import epoch_order
    >>> epoch_order(10, "random", seed=0, epoch=1).tolist()  # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np
import torch

from .format import DataFormatError

ORDERS = ("sequential", "random", "quasi_random")


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def quasi_random(pages: np.ndarray, rng: np.random.Generator, window_pages: int = 8) -> np.ndarray:
    """Page-aware shuffle. ``pages``: (N,) page id of each record; returns a permutation of range(N)."""
    uniq, first = np.unique(pages, return_index=True)             # pages are grouped (non-decreasing per shard)
    bounds = np.append(first, len(pages))
    perm = rng.permutation(len(uniq))
    out = []
    for w in range(0, len(perm), window_pages):
        idx = np.concatenate([np.arange(bounds[p], bounds[p + 1]) for p in perm[w:w + window_pages]])
        out.append(rng.permutation(idx))
    return np.concatenate(out) if out else np.empty(0, np.int64)


def quasi_random_naive(pages: np.ndarray, rng: np.random.Generator, window_pages: int = 8) -> np.ndarray:
    """Reference: the same draw, written record by record."""
    by_page: dict[int, list[int]] = {}
    for i, p in enumerate(pages.tolist()):
        by_page.setdefault(p, []).append(i)
    keys = sorted(by_page)
    shuffled = [keys[i] for i in rng.permutation(len(keys))]
    out: list[int] = []
    for w in range(0, len(shuffled), window_pages):
        window = [i for p in shuffled[w:w + window_pages] for i in by_page[p]]
        out += [window[j] for j in rng.permutation(len(window))]
    return np.array(out, np.int64)


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise DataFormatError(f"order '{order}' is unknown; use one of {', '.join(ORDERS)}")
    return order


def epoch_order(n: int, order: str, seed: int = 0, epoch: int = 0, pages: np.ndarray | None = None,
                window_pages: int = 8) -> np.ndarray:
    """The global order of one epoch: (n,) int64, a permutation of range(n)."""
    check_order(order)
    if order == "sequential":
        return np.arange(n, dtype=np.int64)
    rng = _rng(seed, epoch)
    if order == "random":
        return rng.permutation(n).astype(np.int64)
    if pages is None or len(pages) != n:
        raise DataFormatError("quasi_random needs the page of every record (dataset.pages())")
    return quasi_random(pages, rng, window_pages)


def rank_order(order: np.ndarray, rank: int = 0, world_size: int = 1, batch_size: int = 1,
               drop_last: bool = False) -> np.ndarray:
    """This rank's share of a global order (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise DataFormatError(f"rank {rank} is outside world_size {world_size}")
    if drop_last:
        order = order[: len(order) // (world_size * batch_size) * world_size * batch_size]
    return order[rank::world_size]


class OrderSampler(torch.utils.data.Sampler):
    """The orders above as a ``torch`` sampler, for ``DataLoader(dataset, sampler=...)``.

    Under ``accelerator.prepare`` leave ``rank``/``world_size`` at their defaults: accelerate then shards
    the batches itself. It calls ``set_epoch`` every epoch, which reshuffles.
    """

    def __init__(self, dataset, order: str = "quasi_random", seed: int = 0, window_pages: int = 8,
                 rank: int = 0, world_size: int = 1):
        self.dataset, self.order, self.seed, self.window_pages = dataset, order, seed, window_pages
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        check_order(order)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        pages = self.dataset.pages() if self.order == "quasi_random" else None
        glob = epoch_order(len(self.dataset), self.order, self.seed, self.epoch, pages, self.window_pages)
        return rank_order(glob, self.rank, self.world_size)

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.world_size))
