"""Read-ME decode latency with offloaded experts: pre-gated prefetch vs LRU on demand, side by side.

    python benchmarks/moe_tune.py --cases readme --top-p 0.5 --tokens 65536 --save out/moe-tuned
    python benchmarks/moe_latency.py --model out/moe-tuned --out benchmarks/results/moe_latency.json

The model: ``--model``, a saved SmolLM2-135M pre-gated MoE (the README's figures use the tuned one above:
8 k-means experts, top-p 0.5, alternating rounds); without it, one built here (8 experts from the
docs-sections labels, top-p 0.5, router trained on docs-sections train). Its routed experts are offloaded to ``experts.safetensors`` with room for
``--capacity`` experts per layer in RAM (reads come from the OS page cache: this measures the read and
copy, not a cold disk). Greedy decoding of ``--new-tokens`` tokens after each held-out prompt
(python-docs:eval), one stream, KV cache:
- all in RAM: no offloading (the floor);
- LRU on demand: a layer that misses reads its expert synchronously;
- pre-gated prefetch: the router picks the token's expert before the backbone runs, so a background thread
  starts reading it for every layer while the first layers compute (same eviction, LRU).
The three modes decode identical tokens (checked). Per-token latency: mean and p90 over all tokens, modes
interleaved prompt by prompt.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from moe import calibration_batches, load_smollm2  # noqa: E402

from hf_ext.moe import activation_stats, convert_to_pregated_moe, expert_masks  # noqa: E402
from hf_ext.moe.cache import ExpertCache  # noqa: E402
from hf_ext.moe.router import overlap_scores, train_router  # noqa: E402


@torch.no_grad()
def decode(model, prompt: torch.Tensor, new: int, cache: ExpertCache | None = None, prefetch: bool = False):
    """Greedy tokens and per-token seconds (prefill excluded)."""
    from transformers import DynamicCache

    kv = DynamicCache()
    out = model(prompt, cache=kv, use_cache=True)
    ids, times = prompt, []
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(new):
        ids = torch.cat([ids, nxt], 1)
        t0 = time.perf_counter()
        expert = model.route(ids)[:, -1:]                     # pre-gating: known before the backbone runs
        if prefetch:
            cache.prefetch(expert.flatten().tolist())
        out = model(nxt, cache=kv, use_cache=True, expert_ids=expert)
        if prefetch:
            cache.wait()
        nxt = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return ids[0, prompt.shape[1]:].tolist(), times


def trained_moe(dense, tok):
    """The benchmarks' serving model: 8 experts from the docs-sections labels, top-p 0.5, router trained."""
    batches, labels = calibration_batches(tok, 24)
    masks = expert_masks(activation_stats(dense, batches, clusters=8, labels=labels), top_p=0.5)
    moe = convert_to_pregated_moe(dense, masks).eval()
    train_router(moe, batches, overlap_scores(dense, masks, batches), epochs=6, progress=False)
    return moe


def serving_moe(dense, tok, folder: str | None):
    """The saved pre-gated MoE in `folder` (benchmarks/moe_tune.py --save), else :func:`trained_moe`."""
    if not folder:
        return trained_moe(dense, tok)
    from transformers import AutoModelForCausalLM

    import hf_ext.moe  # noqa: F401  (registers the pre-gated MoE with the Auto classes)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def main():
    from hf_ext.zoo import load_corpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=4, help="experts per layer kept in RAM (of 8)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--model", default=None, help="a saved pre-gated MoE folder (the tuned model of "
                    "benchmarks/moe_tune.py --save); default: the section-label MoE built here")
    ap.add_argument("--out", default="benchmarks/results/moe_latency.json")
    args = ap.parse_args()
    dense, tok = load_smollm2()
    moe = serving_moe(dense, tok, args.model)
    in_ram = copy.deepcopy(moe)
    folder = tempfile.mkdtemp(prefix="hf_ext_experts_")
    cache = ExpertCache.offload(moe, folder, capacity=args.capacity, policy="lru")
    text = load_corpus("python-docs:eval", max_chars=200_000)
    paras = [p for p in text.split("\n\n") if len(p) > 300][:args.prompts]
    times = {"all in RAM": [], "LRU on demand": [], "pre-gated prefetch": []}
    stats = {"LRU on demand": [0, 0], "pre-gated prefetch": [0, 0]}
    for p in paras:
        prompt = tok(p, return_tensors="pt", truncation=True, max_length=64)["input_ids"]
        ref, t = decode(in_ram, prompt, args.new_tokens)
        times["all in RAM"] += t
        for mode, pre in (("LRU on demand", False), ("pre-gated prefetch", True)):
            for layer in cache.resident:
                layer.clear()
            cache.hits = cache.misses = 0
            got, t = decode(moe, prompt, args.new_tokens, cache, prefetch=pre)
            if got != ref:
                raise SystemExit(f"{mode} decoded other tokens than the in-RAM model")
            times[mode] += t
            stats[mode][0] += cache.hits
            stats[mode][1] += cache.misses
    rows = []
    base = statistics.mean(times["LRU on demand"])
    for mode, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        row = {"mode": mode, "mean_ms": 1e3 * statistics.mean(ts), "p90_ms": 1e3 * q[-1],
               "mean_vs_lru_on_demand": statistics.mean(ts) / base - 1}
        if mode in stats:
            h, m = stats[mode]
            row["layer_hit_rate"] = h / max(h + m, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    p90_lru = statistics.quantiles(times["LRU on demand"], n=10)[-1]
    for r in rows:
        r["p90_vs_lru_on_demand"] = r["p90_ms"] / (1e3 * p90_lru) - 1
    res = {"title": "Read-ME: decode latency with offloaded experts (SmolLM2-135M MoE)",
           "command": "python benchmarks/moe_latency.py", "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "sections": {"Per-token latency": {
               "note": f"{len(paras)} held-out prompts x {args.new_tokens} greedy tokens, one stream; {args.capacity} of 8 "
                       "experts per layer in RAM, the rest read from experts.safetensors (page cache); identical "
                       "tokens in every mode. layer_hit_rate counts the forward's lookups (a prefetched expert is a hit).",
               "rows": rows}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
