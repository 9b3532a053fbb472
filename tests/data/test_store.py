"""hf_ext.data: the shard format, stores, orders and the loader (round trips, coverage, resume, bad input).

Everything compared here is data movement (rows written to shards and read back, gathered in any order,
widened from uint16) or integer bookkeeping (indices, counts, offsets), so ``torch.equal`` and exact integer
comparisons hold bit for bit on every machine (tests/numerics.py, kind 1); no arithmetic is involved.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from hf_ext.data import (DataFormatError, Field, Loader, OrderSampler, ShardedDataset, StoreWriter, epoch_order,
                         read_header, write_rows)
from hf_ext.data.order import quasi_random, quasi_random_naive


def _rows_store(path, n=103, shard_records=10, page_size=64, dtype="float32"):
    rows = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    write_rows([rows[:40], rows[40:]], path, dtype=dtype, shard_records=shard_records, provenance={"t": 1},
               page_size=page_size)
    return rows


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rows_round_trip_is_exact(tmp_path, dtype):
    rows = torch.randn(103, 6, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    write_rows([rows[:40], rows[40:]], tmp_path / "s", dtype=dtype, shard_records=10)
    ds = ShardedDataset(tmp_path / "s")
    assert len(ds) == 103 and len(ds.shards) == 11
    got = ds.__getitems__(np.arange(103))["x"]
    assert got.dtype == rows.dtype and torch.equal(got, rows)
    assert torch.equal(ds[57]["x"], rows[57])
    picked = [98, 3, 57, 3, 10]  # any order, repeats, across shards
    assert torch.equal(ds.__getitems__(picked)["x"], rows[picked])


def test_mixed_fields_with_variable_bytes(tmp_path):
    fields = [Field("ids", "uint32", (3,)), Field("blob", variable=True), Field("y", "int64")]
    blobs = [bytes([i]) * i for i in range(25)]
    with StoreWriter(tmp_path / "s", fields, shard_records=7) as w:
        w.write_batch({"ids": np.arange(75).reshape(25, 3) + 2 ** 31, "blob": blobs, "y": np.arange(25) - 5})
    b = ShardedDataset(tmp_path / "s").__getitems__([24, 0, 13])
    assert b["ids"].dtype == torch.uint32 and b["ids"][0].tolist() == [2 ** 31 + 72, 2 ** 31 + 73, 2 ** 31 + 74]
    assert [bytes(t.numpy()) for t in b["blob"]] == [blobs[24], blobs[0], blobs[13]]
    assert b["y"].tolist() == [19, -5, 8]


def test_layout_is_page_aligned_and_documented(tmp_path):
    _rows_store(tmp_path / "s")
    h = read_header(tmp_path / "s" / "shard-00000.hfd")
    assert h["data_offset"] % 4096 == 0 and h["count"] == 10 and h["record_bytes"] == 24
    assert h["file_bytes"] == h["data_offset"] + 10 * 24 and h["provenance"] == {"t": 1}


def test_truncated_shard_unknown_version_and_incomplete_store_are_clear_errors(tmp_path):
    _rows_store(tmp_path / "s")
    shard = tmp_path / "s" / "shard-00003.hfd"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-5])
    with pytest.raises(DataFormatError, match="truncated .* rerun the same write command"):
        ShardedDataset(tmp_path / "s")
    shard.write_bytes(raw[:8] + struct.pack("<I", 99) + raw[12:])
    with pytest.raises(DataFormatError, match="format version 99; this hf-ext reads version 1"):
        ShardedDataset(tmp_path / "s")
    with pytest.raises(DataFormatError, match="not an hf-ext store"):
        ShardedDataset(tmp_path)


def test_expected_dtype_and_shape_are_checked(tmp_path):
    _rows_store(tmp_path / "s")
    ShardedDataset(tmp_path / "s", dtypes={"x": "float32"}, shapes={"x": (6,)})
    with pytest.raises(DataFormatError, match="field 'x' is float32, expected float16"):
        ShardedDataset(tmp_path / "s", dtypes={"x": "float16"})
    with pytest.raises(DataFormatError, match=r"shape \(6,\), expected \(384,\)"):
        ShardedDataset(tmp_path / "s", shapes={"x": (384,)})
    with pytest.raises(DataFormatError, match="do not fit uint16"):
        with StoreWriter(tmp_path / "t", [Field("ids", "uint16", (2,))]) as w:
            w.write_batch({"ids": np.array([[1, 70000]])})


def test_interrupted_write_resumes_to_the_same_store(tmp_path):
    rows = torch.randn(45, 4, generator=torch.Generator().manual_seed(1))

    def batches(fail_at=None):
        for i in range(0, 45, 8):
            if i == fail_at:
                raise KeyboardInterrupt
            yield rows[i:i + 8]

    with pytest.raises(KeyboardInterrupt):
        write_rows(batches(fail_at=32), tmp_path / "s", dtype="float32", shard_records=10)
    assert not list((tmp_path / "s").glob(".*tmp*"))              # the partial shard is gone
    with pytest.raises(DataFormatError, match=r"incomplete \(30 records in 3 shards"):
        ShardedDataset(tmp_path / "s")
    with pytest.raises(DataFormatError, match="other fields"):
        write_rows(batches(), tmp_path / "s", dtype="float16", shard_records=10)
    index = write_rows(batches(), tmp_path / "s", dtype="float32", shard_records=10)  # same command: resumes
    assert index["complete"] and index["count"] == 45
    assert torch.equal(ShardedDataset(tmp_path / "s").__getitems__(range(45))["x"], rows)
    with pytest.raises(DataFormatError, match="already exists and is complete"):
        write_rows(batches(), tmp_path / "s")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(DataFormatError, match="not an hf-ext store"):
        write_rows(batches(), tmp_path / "junk")


@pytest.mark.parametrize("order", ["sequential", "random", "quasi_random"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_record_once_per_epoch_disjoint_across_ranks(tmp_path, order, world_size):
    _rows_store(tmp_path / "s")  # 103 records: the ranks get 52 and 51
    ds = ShardedDataset(tmp_path / "s", with_index=True)
    for epoch in range(2):
        seen = []
        for rank in range(world_size):
            loader = Loader(ds, batch_size=8, order=order, seed=3, rank=rank, world_size=world_size)
            loader.set_epoch(epoch)
            mine = torch.cat([b["index"] for b in loader]).tolist()
            assert len(mine) == len(range(rank, 103, world_size)) and len(list(loader._batches(epoch, 0))) == len(loader)
            seen += mine
        assert sorted(seen) == list(range(103))


def test_orders_are_deterministic_shuffled_and_page_local(tmp_path):
    _rows_store(tmp_path / "s", n=1000, shard_records=300, page_size=240)  # 10 records per page
    ds = ShardedDataset(tmp_path / "s")
    pages = ds.pages()
    assert len(np.unique(pages)) == 100                                # 30+30+30+10 pages over 4 shards
    a = epoch_order(1000, "quasi_random", 0, 0, pages, window_pages=4)
    assert np.array_equal(a, epoch_order(1000, "quasi_random", 0, 0, pages, window_pages=4))
    assert not np.array_equal(a, epoch_order(1000, "quasi_random", 0, 1, pages, window_pages=4))
    assert not np.array_equal(a, np.arange(1000))
    for w in range(0, 1000, 40):                                       # 4 pages of 10 records per window
        assert len(np.unique(pages[a[w:w + 40]])) <= 4
    r = epoch_order(1000, "random", 0, 0)
    assert len(np.unique(pages[r[:40]])) > 20                          # random order scatters reads
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert np.array_equal(quasi_random(pages, rng1, 3), quasi_random_naive(pages, rng2, 3))


def test_drop_last_gives_equal_full_batches(tmp_path):
    _rows_store(tmp_path / "s")
    ds = ShardedDataset(tmp_path / "s", with_index=True)
    loaders = [Loader(ds, 8, "random", rank=r, world_size=2, drop_last=True) for r in range(2)]
    batches = [[b["index"] for b in lo] for lo in loaders]
    assert [len(b) for b in batches] == [6, 6] and all(len(x) == 8 for b in batches for x in b)
    both = torch.cat([x for b in batches for x in b]).tolist()
    assert len(set(both)) == 96


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_resumes_mid_epoch(tmp_path, prefetch):
    _rows_store(tmp_path / "s")
    ds = ShardedDataset(tmp_path / "s", with_index=True)
    full = [b["index"].tolist() for b in Loader(ds, 8, "quasi_random", seed=1, rank=0, world_size=1)]
    loader = Loader(ds, 8, "quasi_random", seed=1, rank=0, world_size=1, prefetch=prefetch)
    first = []
    for b in loader:
        first.append(b["index"].tolist())
        if len(first) == 5:
            break
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["step"] == 5
    again = Loader(ds, 8, "quasi_random", seed=1, rank=0, world_size=1)
    again.load_state_dict(state)
    assert first + [b["index"].tolist() for b in again] == full
    assert again.state_dict()["epoch"] == 1
    with pytest.raises(DataFormatError, match="resume with the same ones"):
        Loader(ds, 8, "random", seed=1, rank=0, world_size=1).load_state_dict(state)


def test_loader_widens_token_ids_and_reports_worker_errors(tmp_path):
    with StoreWriter(tmp_path / "t", [Field("input_ids", "uint16", (4,))]) as w:
        w.write_batch({"input_ids": np.arange(40).reshape(10, 4) + 60000})
    b = next(iter(Loader(ShardedDataset(tmp_path / "t"), 3, "sequential", rank=0, world_size=1)))
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"][0].tolist() == [60000, 60001, 60002, 60003]

    class Broken(ShardedDataset):
        def __getitems__(self, indices):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(Loader(Broken(tmp_path / "t"), 3, rank=0, world_size=1))


def test_sampler_plugs_into_a_dataloader(tmp_path):
    rows = _rows_store(tmp_path / "s")
    ds = ShardedDataset(tmp_path / "s", with_index=True)
    sampler = OrderSampler(ds, "quasi_random", seed=0)
    dl = torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler, collate_fn=ShardedDataset.collate)
    got = [b for b in dl]
    idx = torch.cat([b["index"] for b in got])
    assert sorted(idx.tolist()) == list(range(103))
    assert torch.equal(torch.cat([b["x"] for b in got]), rows[idx])
    sampler.set_epoch(1)
    assert torch.cat([b["index"] for b in dl]).tolist() != idx.tolist()


def test_bad_order_and_rank(tmp_path):
    _rows_store(tmp_path / "s")
    ds = ShardedDataset(tmp_path / "s")
    with pytest.raises(DataFormatError, match="use one of sequential, random, quasi_random"):
        Loader(ds, 8, "shuffle", rank=0, world_size=1)
    with pytest.raises(DataFormatError, match="rank 2 is outside world_size 2"):
        Loader(ds, 8, rank=2, world_size=2)


def test_append_adds_records_and_an_interrupted_append_resumes(tmp_path):
    rows = torch.randn(60, 4, generator=torch.Generator().manual_seed(2))
    write_rows([rows[:25]], tmp_path / "s", dtype="float32", shard_records=10, provenance={"sources": ["a"], "m": 1})

    def more(fail_at=None):
        for i in range(25, 60, 5):
            if i == fail_at:
                raise KeyboardInterrupt
            yield rows[i:i + 5]

    with pytest.raises(KeyboardInterrupt):
        write_rows(more(fail_at=50), tmp_path / "s", dtype="float32", shard_records=10, append=True,
                   provenance={"sources": ["b"], "m": 1})
    index = write_rows(more(), tmp_path / "s", dtype="float32", shard_records=10, append=True,
                       provenance={"sources": ["b"], "m": 1})
    assert index["complete"] and index["count"] == 60 and index["provenance"]["sources"] == ["a", "b"]
    assert torch.equal(ShardedDataset(tmp_path / "s").__getitems__(range(60))["x"], rows)
    with pytest.raises(DataFormatError, match="holds other provenance"):
        write_rows(more(), tmp_path / "s", dtype="float32", append=True, provenance={"m": 2})
    with pytest.raises(DataFormatError, match="holds other fields"):
        write_rows(more(), tmp_path / "s", dtype="float16", append=True, provenance={"m": 1})
