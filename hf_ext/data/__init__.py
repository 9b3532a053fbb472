"""A fast data path in the spirit of FFCV: page-aligned memory-mapped shards, page-aware shuffling and a
prefetching loader, shared by every training loop in hf-ext.

- ``format``: the shard file (``Field``, ``ShardWriter``, ``Shard``, ``read_header``).
- ``store``: a folder of shards (``StoreWriter``, ``ShardedDataset``), atomic and resumable.
- ``order``: sequential / random / quasi_random orders, per rank (``OrderSampler`` for ``DataLoader``).
- ``loader``: ``Loader``, batches with a background thread and device transfer, resumable.
- ``sources``: token windows, dense rows and images; ``interop``: HF datasets and object storage.

Example:
    >>> from hf_ext.data import Loader, ShardedDataset, write_token_windows
    >>> write_token_windows(["notes.txt"], "smollm2-135m", 512, "tokens/")  # doctest: +SKIP
    >>> for batch in Loader(ShardedDataset("tokens/"), batch_size=8):  # doctest: +SKIP
    ...     batch["input_ids"].shape   # (8, 512) int64
"""
from .format import DataFormatError, Field, Shard, ShardWriter, read_header
from .interop import fetch_store, from_hf_dataset, to_hf_dataset
from .loader import Loader
from .order import ORDERS, OrderSampler, epoch_order
from .sources import decode_images, write_images, write_rows, write_token_windows
from .store import ShardedDataset, StoreWriter

__all__ = ["DataFormatError", "Field", "Loader", "ORDERS", "OrderSampler", "Shard", "ShardWriter",
           "ShardedDataset", "StoreWriter", "decode_images", "epoch_order", "fetch_store", "from_hf_dataset",
           "read_header", "to_hf_dataset", "write_images", "write_rows", "write_token_windows"]
