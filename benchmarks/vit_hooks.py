"""Hook points, activation stores and SAEs, measured side by side in one run.

    python benchmarks/vit_hooks.py --parts overhead store sae --out benchmarks/results/vit_hooks.json

- overhead: a forward with every residual point cached (``run_with_cache``) vs the plain forward, and
  with every point including attention internals (which switch to an unfused path), interleaved
  medians. Models: timm ViT-B/16 at 224 (random init: no ViT weights offline), the real MiniLM-L6 and
  SmolLM2-135M on real text.
- store: writing and reading activation rows (width 768, fp32), hf-ext store vs a Prisma-style
  ``torch.save`` chunk store (chunks of 16384 rows; reading shuffles the chunk order and the rows within a
  chunk, as a shuffling buffer does). Reads are random batches of 4096 rows, what SAE training draws.
- sae: top-k SAEs (k=32, expansion 16) trained on real activations (MiniLM layer 3 and SmolLM2 layer 15,
  residual stream after the block, every token of python-docs:train), scored on activations of
  python-docs:eval (other files): explained variance, L0, dead latents, and the downstream effect of
  splicing the reconstruction back in (SmolLM2: next-token loss; MiniLM: cosine of mean-pooled
  sentence embeddings to the clean ones).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.vit_hooks import HookedVision  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def overhead(repeats: int) -> list[dict]:
    import timm

    from hf_ext.vit_hooks.store import text_batches
    from hf_ext.zoo import load_causal_lm, load_corpus, resolve_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    cases = [("timm vit_base_patch16_224 (random init), 4 x 224^2",
              timm.create_model("vit_base_patch16_224", pretrained=False).eval(), (torch.randn(4, 3, 224, 224),), {})]
    text = load_corpus("python-docs:eval", max_chars=200_000)
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    batch = next(text_batches(tok, [text], 128, 8))
    cases.append(("MiniLM-L6 (real), 8 x 128 tokens", AutoModel.from_pretrained(resolve_model("minilm-l6")).eval(), (),
                  batch))
    lm, tok = load_causal_lm("smollm2-135m")
    cases.append(("SmolLM2-135M (real), 2 x 256 tokens", lm, (), next(text_batches(tok, [text], 256, 2))))
    rows = []
    for name, model, args, kwargs in cases:
        hv = HookedVision(model)
        resid = lambda n: "resid" in n or n in ("hook_embed", "hook_final")  # noqa: E731
        t = interleaved({"plain": lambda: model(*args, **kwargs),
                         "resid": lambda: hv.run_with_cache(*args, **kwargs, names_filter=resid),
                         "all": lambda: hv.run_with_cache(*args, **kwargs)}, repeats)
        rows.append({"model": name, "layers": hv.n_layers, "resid_points": len(hv.names(resid)),
                     "plain_ms": 1e3 * t["plain"], "cache_resid_over_plain": t["resid"] / t["plain"],
                     "cache_all_points_over_plain": t["all"] / t["plain"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def store(rows_n: int, repeats: int, width: int = 768, batch: int = 4096, chunk: int = 16384) -> list[dict]:
    from hf_ext.data import Loader, ShardedDataset, write_rows

    x = torch.randn(rows_n, width, generator=torch.Generator().manual_seed(0))
    out = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        k, j = iter(range(10 ** 6)), iter(range(10 ** 6))

        def ours_write():
            write_rows((x[i:i + batch] for i in range(0, rows_n, batch)), d / f"ours{next(k)}", dtype="float32",
                       name="activations")

        def torch_write():
            sub = d / f"pt{next(j)}"
            sub.mkdir()
            for i in range(0, rows_n, chunk):
                torch.save(x[i:i + chunk].clone(), sub / f"chunk_{i // chunk}.pt")

        tw = interleaved({"ours": ours_write, "torch.save": torch_write}, repeats)
        ds = ShardedDataset(d / "ours0")
        loader = Loader(ds, batch, order="random", drop_last=True, rank=0, world_size=1)
        chunks = sorted((d / "pt0").glob("chunk_*.pt"))
        assert len(chunks) == -(-rows_n // chunk) and len(ds) == rows_n
        epochs = iter(range(10 ** 6))

        def ours_read():
            loader.set_epoch(next(epochs))
            for _ in loader:
                pass

        def torch_read():
            g = torch.Generator().manual_seed(next(epochs))
            for c in torch.randperm(len(chunks), generator=g).tolist():
                rows = torch.load(chunks[c])
                perm = torch.randperm(len(rows), generator=g)
                for i in range(0, len(rows) - batch + 1, batch):
                    rows[perm[i:i + batch]]

        tr = interleaved({"ours": ours_read, "torch.save": torch_read}, repeats)
    for name in ("ours", "torch.save"):
        out.append({"store": "hf-ext store" if name == "ours" else "torch.save chunks (Prisma-style)",
                    "write_rows_per_s": rows_n / tw[name], "read_rows_per_s": rows_n / tr[name]})
    out[0]["read_speedup"] = tr["torch.save"] / tr["ours"]
    out[0]["write_speedup"] = tw["torch.save"] / tw["ours"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["overhead", "store", "sae"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--store-rows", type=int, default=262144)
    ap.add_argument("--out", default="benchmarks/results/vit_hooks.json")
    args = ap.parse_args()
    path = Path(args.out)
    res = json.loads(path.read_text()) if path.exists() else {
        "title": "ViT hooks: caching overhead, activation store throughput, SAEs on real activations",
        "command": "python benchmarks/vit_hooks.py", "sections": {}}
    res["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads"
    if "overhead" in args.parts:
        res["sections"]["Caching overhead"] = {
            "note": f"run_with_cache of every residual point (and of every point) over the plain forward, interleaved "
                    f"medians of {args.repeats}, CPU fp32.", "rows": overhead(args.repeats)}
    if "store" in args.parts:
        res["sections"]["Activation store"] = {
            "note": f"{args.store_rows} rows x 768 fp32 ({args.store_rows * 768 * 4 / 1e6:.0f} MB), warm page cache; "
                    f"reads are random batches of 4096, one epoch; medians of {args.repeats}. Goal: >= 2x on read.",
            "rows": store(args.store_rows, args.repeats)}
        print(json.dumps(res["sections"]["Activation store"]["rows"], indent=1), flush=True)
    if "sae" in args.parts:
        from sae_real import sae_rows  # benchmarks/sae_real.py

        res["sections"]["SAEs on real activations"] = sae_rows()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
