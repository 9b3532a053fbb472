"""The data path (hf_ext/data) against the usual loaders, side by side in one run.

    python benchmarks/data.py --out benchmarks/results/data.json

Tokens: real SmolLM2 token windows of the Python docs (python-docs:train, window 512, uint16), tiled to
``--windows`` records so the store is not trivially small. Every reader delivers the same thing, batches
of 64 windows as int64 tensors in a random order, and is timed over the same number of batches:
- ours: ``Loader(order="random")``, background prefetch;
- HF ``datasets`` with ``with_format("torch")``, indexed one batch at a time (its fastest access), and
  the same dataset through a ``DataLoader`` with a ``RandomSampler`` (its common use);
- a plain ``DataLoader`` over a Python list of int64 tensors (``shuffle=True``).
MB/s counts the stored bytes (2 per token). The sequential row reads the whole store in file order with
``widen_ints=False`` and is compared with ``np.copyto`` of the same number of bytes (memcpy), both from
memory (warm page cache).

Images: the real scikit-image photos, tiled into a 2-class ImageFolder; batches of 64 at 64x64, turned
into normalised float (B, 3, 64, 64) as a training loop would:
- ours raw: the store holds 64x64 uint8 pixels (resized once when written);
- ours jpeg: the store holds 64x64 JPEG bytes, decoded per batch;
- torchvision ``ImageFolder`` + ``DataLoader`` (Resize 64, CenterCrop 64, PILToTensor; 2 workers).
Medians over ``--repeats`` passes, in one run.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.data import Loader, ShardedDataset, StoreWriter, Field, decode_images, write_images, write_token_windows  # noqa: E402
from hf_ext.zoo import corpus_files, real_images  # noqa: E402

B = 64


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: page cache, thread start, imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def token_store(tmp: Path, windows: int) -> Path:
    real = tmp / "real"
    write_token_windows(corpus_files("python-docs:train"), "smollm2-135m", 512, real, progress=False)
    ids = ShardedDataset(real).__getitems__(range(len(ShardedDataset(real))))["input_ids"]
    tiled = tmp / "tokens"
    with StoreWriter(tiled, [Field("input_ids", "uint16", (512,))], {"tiled_from": str(real)}) as w:
        for i in range(0, windows, len(ids)):
            w.write_batch({"input_ids": ids[: min(len(ids), windows - i)]})
    return tiled


def bench_tokens(tmp: Path, windows: int, batches: int, repeats: int) -> list[dict]:
    import datasets

    from hf_ext.data import to_hf_dataset

    store = token_store(tmp, windows)
    ds = ShardedDataset(store)
    order = np.random.default_rng(0).permutation(len(ds))[: batches * B]
    hf = to_hf_dataset(store, cache_dir=str(tmp / "hf_cache")).with_format("torch")
    as_list = [t.long() for t in ds.__getitems__(range(len(ds)))["input_ids"]]
    loader = Loader(ds, B, order="random", rank=0, world_size=1)
    epochs = iter(range(10 ** 6))

    def ours():
        loader.set_epoch(next(epochs))  # a fresh epoch each pass: always `batches` full batches
        for k, b in enumerate(loader):
            assert b["input_ids"].dtype == torch.int64
            if k + 1 == batches:
                break

    def hf_indexed():
        for k in range(batches):
            x = hf[order[k * B:(k + 1) * B].tolist()]["input_ids"].long()
        return x

    def hf_dataloader():
        dl = torch.utils.data.DataLoader(hf, batch_size=B, sampler=torch.utils.data.RandomSampler(hf))
        for k, b in enumerate(dl):
            if k + 1 == batches:
                break

    def plain_list():
        dl = torch.utils.data.DataLoader(as_list, batch_size=B, shuffle=True)
        for k, _ in enumerate(dl):
            if k + 1 == batches:
                break

    mb = batches * B * 512 * 2 / 1e6
    rows = []
    for name, fn in [("hf-ext Loader (random)", ours), ("HF datasets, with_format('torch'), batch indexing", hf_indexed),
                     ("HF datasets, with_format('torch') + DataLoader", hf_dataloader),
                     ("DataLoader over a list of tensors", plain_list)]:
        t = median_time(fn, repeats)
        rows.append({"reader": name, "windows_per_s": batches * B / t, "MB_per_s": mb / t})
    for r in rows:
        r["ours_speedup"] = rows[0]["windows_per_s"] / r["windows_per_s"]
    # sequential bandwidth vs memcpy of the same bytes
    seq = Loader(ds, 1024, order="sequential", rank=0, world_size=1, widen_ints=False, prefetch=0)
    nbytes = len(ds) * 512 * 2
    t_seq = median_time(lambda: [None for _ in seq], repeats)
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    t_cpy = median_time(lambda: np.copyto(dst, src), repeats)
    rows.append({"reader": "hf-ext sequential read (mmap)", "MB_per_s": nbytes / 1e6 / t_seq,
                 "memcpy_MB_per_s": nbytes / 1e6 / t_cpy, "memcpy_over_ours": t_seq / t_cpy})
    del datasets
    return rows


def bench_images(tmp: Path, copies: int, repeats: int) -> list[dict]:
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    folder = tmp / "images"
    for c in range(copies):
        for i, p in enumerate(real_images()):
            d = folder / ("a" if i % 2 else "b")
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, d / f"{c}_{p.name}")
    write_images(folder, 64, tmp / "raw", progress=False)
    write_images(folder, 64, tmp / "jpeg", encode="jpeg", progress=False)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)

    def to_float(x):  # (B, H, W, 3) uint8 -> (B, 3, H, W) normalised, as a training step starts
        return (x.permute(0, 3, 1, 2).float() / 255 - mean) / 0.5

    raw = Loader(ShardedDataset(tmp / "raw"), B, order="quasi_random", rank=0, world_size=1)
    jpeg = Loader(ShardedDataset(tmp / "jpeg"), B, order="quasi_random", rank=0, world_size=1)
    tf = T.Compose([T.Resize(64), T.CenterCrop(64), T.PILToTensor()])
    folder_ds = tvd.ImageFolder(str(folder), transform=tf)
    n = len(folder_ds)

    def ours_raw():
        return [to_float(b["image"]) for b in raw]

    def ours_jpeg():
        return [to_float(decode_images(b["image"])) for b in jpeg]

    def image_folder():
        dl = torch.utils.data.DataLoader(folder_ds, batch_size=B, shuffle=True, num_workers=2)
        return [(x.float() / 255 - mean) / 0.5 for x, _ in dl]

    rows = []
    for name, fn in [("hf-ext Loader, raw 64x64 store", ours_raw), ("hf-ext Loader, JPEG store (decoded per batch)", ours_jpeg),
                     ("torchvision ImageFolder + DataLoader (2 workers)", image_folder)]:
        t = median_time(fn, repeats)
        rows.append({"reader": name, "images": n, "batches_per_s": n / B / t, "images_per_s": n / t})
    for r in rows:
        r["ours_raw_speedup"] = rows[0]["images_per_s"] / r["images_per_s"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=50000)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/data.json")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as d:
        tok = bench_tokens(Path(d), args.windows, args.batches, args.repeats)
        print(json.dumps(tok, indent=1), flush=True)
        img = bench_images(Path(d), args.copies, args.repeats)
        print(json.dumps(img, indent=1), flush=True)
    res = {"title": "Data path: hf-ext stores vs HF datasets, DataLoader and ImageFolder",
           "command": "python benchmarks/data.py", "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "sections": {
               "Random token-window reads": {"note": f"{args.windows} windows of 512 real SmolLM2 tokens (uint16, "
                                             f"{args.windows * 1024 / 1e6:.0f} MB), {args.batches} batches of {B}, "
                                             f"median of {args.repeats}. Goals: >= 3x HF datasets on random reads; "
                                             "sequential read within 2x of memcpy.", "rows": tok},
               "Images into a training loop": {"note": f"{len(real_images())} real photos x {args.copies} copies, "
                                               f"64x64, batches of {B}, one epoch per pass, median of {args.repeats}.",
                                               "rows": img}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
