"""The fast loader: batches in a traversal order, gathered from the memory map by a background thread.

What makes it fast (FFCV's recipe, minus the custom file system and JIT):
- a batch is one gather of whole records from the OS page cache (``ShardedDataset.__getitems__``), with
  the batch's indices sorted so the gather walks the file forwards;
- a background thread prepares the next ``prefetch`` batches (numpy's copy and page faults release the
  GIL) and pins them when the target is CUDA, so the host-to-device copy is asynchronous;
- compact dtypes travel as stored (uint16 token ids are a quarter of int64) and are widened on the device.

Resume: the loader counts ``(epoch, step)``; ``state_dict()``/``load_state_dict()`` restore it, and
``accelerator.register_for_checkpointing(loader)`` puts it in ``save_state``/``load_state``.

Example:
    >>> from hf_ext.data import Loader, ShardedDataset
    >>> loader = Loader(ShardedDataset("tokens"), batch_size=8, order="quasi_random", device="cuda")  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
"""
from __future__ import annotations

import math
import queue
import threading

import numpy as np
import torch

from .format import DataFormatError
from .order import check_order, epoch_order, rank_order

_END = object()


class Loader:
    """Iterate a ``ShardedDataset`` in batches, one epoch per ``iter()``.

    Args:
        dataset: a ``ShardedDataset``.
        batch_size: records per batch (per rank).
        order: ``sequential``, ``random`` or ``quasi_random`` (see ``hf_ext.data.order``).
        seed: orders are a pure function of (seed, epoch).
        drop_last: drop the tail so every rank gets the same number of full batches (DDP needs equal steps);
            otherwise every record is read exactly once per epoch and the last batch may be short.
        device: where batches go (``None``: stay on the CPU). Integer fields stored as uint16/uint32 are
            widened to int64 there (``widen_ints=False`` keeps them).
        rank / world_size: this process's share; ``None`` takes them from ``accelerate.PartialState``.
        prefetch: batches prepared ahead by the background thread (0: no thread).
        window_pages: the QUASI_RANDOM window.
    """

    def __init__(self, dataset, batch_size: int, order: str = "quasi_random", seed: int = 0,
                 drop_last: bool = False, device=None, rank: int | None = None, world_size: int | None = None,
                 prefetch: int = 2, window_pages: int = 8, widen_ints: bool = True):
        if batch_size < 1:
            raise DataFormatError(f"batch_size={batch_size}; give a positive number")
        if rank is None or world_size is None:
            from accelerate import PartialState

            state = PartialState()
            rank, world_size = state.process_index, state.num_processes
        self.dataset, self.batch_size, self.order, self.seed = dataset, batch_size, order, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.prefetch, self.window_pages, self.widen_ints = prefetch, window_pages, widen_ints
        self.epoch, self.step = 0, 0
        rank_order(np.empty(0, np.int64), rank, world_size)  # a bad rank fails here
        check_order(order)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's records for ``epoch``, in reading order."""
        pages = self.dataset.pages() if self.order == "quasi_random" else None
        glob = epoch_order(len(self.dataset), self.order, self.seed, epoch, pages, self.window_pages)
        return rank_order(glob, self.rank, self.world_size, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return n // (self.world_size * self.batch_size)
        return math.ceil(len(range(self.rank, n, self.world_size)) / self.batch_size)

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        self.epoch, self.step = epoch, step

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seed"), state.get("order")) != (self.seed, self.order):
            raise DataFormatError(f"loader state is for seed={state.get('seed')} order={state.get('order')}, "
                                  f"this loader has seed={self.seed} order={self.order}; resume with the same ones")
        self.set_epoch(state["epoch"], state["step"])

    def _batches(self, epoch: int, start: int):
        idx = self.indices(epoch)
        for b in range(start, len(self)):
            yield np.sort(idx[b * self.batch_size:(b + 1) * self.batch_size])

    def _prepare(self, b: np.ndarray) -> dict:
        out = self.dataset.__getitems__(b)
        if self.device is not None and self.device.type == "cuda":
            out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out

    def _to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                if self.device is not None:
                    v = v.to(self.device, non_blocking=True)
                if self.widen_ints and v.dtype in (torch.uint16, torch.uint32):
                    v = v.to(torch.int64)
            out[k] = v
        return out

    def __iter__(self):
        """One epoch from ``(self.epoch, self.step)``; afterwards the loader points at the next epoch."""
        epoch, start = self.epoch, self.step
        source = self._threaded(epoch, start) if self.prefetch > 0 else map(self._prepare, self._batches(epoch, start))
        for step, batch in enumerate(source, start):
            self.step = step + 1
            yield self._to_device(batch)
        self.epoch, self.step = epoch + 1, 0

    def _threaded(self, epoch: int, start: int):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for b in self._batches(epoch, start):
                    if not put(self._prepare(b)):
                        return
                put(_END)
            except BaseException as e:  # surfaces in the consumer
                put(e)

        worker = threading.Thread(target=produce, name="hf_ext.data.Loader", daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # stopped early (break) or done: free the producer from a full queue, then wait for it
            stop.set()
            while worker.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(0.001)


def token_batches(store, batch_size: int, seq_len: int, steps: int, start: int = 0, seed: int = 0,
                  device=None, vocab_size: int | None = None):
    """``input_ids`` batches (batch_size, seq_len) int64 for training steps ``start .. steps-1``, from a token
    store, epoch after epoch in random order, this rank's share only (``drop_last``: ranks stay in step).

    Step k of a run is always the same batch, so a run resumed at ``start`` continues exactly.
    """
    from .store import ShardedDataset

    ds = store if isinstance(store, ShardedDataset) else ShardedDataset(store)
    field = ds.fields[0]
    if field.name != "input_ids" or field.variable or field.shape != (seq_len,):
        raise DataFormatError(f"store {ds.root} holds {field.name} {field.shape}; training needs input_ids "
                              f"windows of {seq_len} tokens. Write it with `hf-ext data tokens --window {seq_len}`")
    store_vocab = ds.provenance.get("vocab_size")
    if vocab_size is not None and store_vocab is not None and store_vocab > vocab_size:
        raise DataFormatError(f"store {ds.root} was tokenized with {store_vocab} ids ({ds.provenance.get('tokenizer')}), "
                              f"more than the model's {vocab_size}; write it with the model's tokenizer")
    loader = Loader(ds, batch_size, order="random", seed=seed, drop_last=True, device=device)
    if len(loader) == 0:
        raise DataFormatError(f"store {ds.root} has {len(ds)} windows, fewer than one batch of {batch_size} per "
                              "process; write more text into it or lower the batch size")
    loader.set_epoch(start // len(loader), start % len(loader))

    def batches():  # the checks above run now, not at the first batch
        step = start
        while step < steps:
            for batch in loader:
                yield batch["input_ids"]
                step += 1
                if step == steps:
                    return

    return batches()
