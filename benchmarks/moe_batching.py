"""Read-ME expert-aware batching vs first-come-first-served, on real routed requests, side by side.

    python benchmarks/moe_tune.py --cases readme --top-p 0.5 --tokens 65536 --save out/moe-tuned
    python benchmarks/moe_batching.py --model out/moe-tuned --out benchmarks/results/moe_batching.json

The model is moe_latency.py's (``--model``: the README's figures use the tuned MoE saved above).
Workload: ``--requests`` held-out paragraphs of python-docs:eval arrive at once; each decodes its next ``--tokens`` tokens of the real text (teacher
forced, so every policy serves the same tokens), each token's expert from the router on the request's
prefix. Each step the batcher picks up to ``--batch`` queued tokens and the backbone runs on them (B x 1
tokens with their experts; no KV cache, so the measured step is the part the experts change: every
layer's MLP, plus projections and norms). Policies, interleaved round by round:
- fcfs: the oldest queued tokens (the baseline; with everything queued at once it is round-robin);
- expert-aware: Read-ME's Algorithm 1 (longest expert queues first);
- expert-aware, max_wait 4: the same with a starvation bound (hf-ext's addition).
Two memory settings: all experts in RAM, and 4 of 8 experts per layer in RAM (LRU, the rest read from
experts.safetensors). Reported per policy, median over rounds: distinct experts per batch, step time,
throughput, and each request's normalized latency (finish time / tokens; mean and p95).
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
from moe import load_smollm2  # noqa: E402
from moe_latency import serving_moe  # noqa: E402

from hf_ext.moe.batching import ExpertBatcher  # noqa: E402
from hf_ext.moe.cache import ExpertCache  # noqa: E402

POLICIES = {"fcfs": dict(policy="fcfs"), "expert-aware": dict(policy="expert"),
            "expert-aware, max_wait 4": dict(policy="expert", max_wait=4)}


def workload(model, tok, requests: int, prompt: int, tokens: int):
    """[(token ids (tokens,), experts (tokens,))] of held-out requests; experts from the router on the prefix."""
    from hf_ext.zoo import load_corpus

    text = load_corpus("python-docs:eval", max_chars=400_000)
    out = []
    for para in (p for p in text.split("\n\n") if len(p) > 600):
        ids = tok(para, return_tensors="pt")["input_ids"][:, :prompt + tokens]
        if ids.shape[1] == prompt + tokens:
            out.append((ids[0, prompt:], model.route(ids)[0, prompt:]))
        if len(out) == requests:
            return out
    raise SystemExit(f"python-docs:eval has fewer than {requests} paragraphs of {prompt + tokens} tokens")


@torch.no_grad()
def serve(model, work, batch: int, cache: ExpertCache | None, **policy) -> dict:
    """Serve every request's tokens through the batcher; real backbone steps, timed."""
    if cache is not None:
        for layer in cache.resident:
            layer.clear()
    b, pos, done = ExpertBatcher(batch, **policy), [0] * len(work), [0.0] * len(work)
    for r, (_, experts) in enumerate(work):
        b.add(r, int(experts[0]))
    clock, steps, distinct = 0.0, [], []
    while len(b):
        rs = b.next_batch()
        ids = torch.stack([work[r][0][pos[r]] for r in rs])[:, None]             # (b, 1)
        exp = torch.stack([work[r][1][pos[r]] for r in rs])[:, None]             # (b, 1)
        t0 = time.perf_counter()
        model(ids, expert_ids=exp, use_cache=False)
        steps.append(time.perf_counter() - t0)
        clock += steps[-1]
        distinct.append(len(set(exp.flatten().tolist())))
        for r in rs:
            pos[r] += 1
            if pos[r] < len(work[r][1]):
                b.add(r, int(work[r][1][pos[r]]))
            else:
                done[r] = clock
    norm = [done[r] / len(work[r][1]) for r in range(len(work))]
    return {"distinct_experts_per_batch": statistics.mean(distinct), "step_ms": 1e3 * statistics.mean(steps),
            "tokens_per_s": sum(len(w[1]) for w in work) / clock,
            "norm_latency_mean_ms": 1e3 * statistics.mean(norm),
            "norm_latency_p95_ms": 1e3 * statistics.quantiles(norm, n=20)[-1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48, help="decoded tokens per request")
    ap.add_argument("--batch", type=int, default=8, help="tokens per batch")
    ap.add_argument("--capacity", type=int, default=4, help="experts per layer in RAM when offloaded (of 8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="a saved pre-gated MoE folder (the tuned model of "
                    "benchmarks/moe_tune.py --save); default: the section-label MoE built here")
    ap.add_argument("--out", default="benchmarks/results/moe_batching.json")
    args = ap.parse_args()
    dense, tok = load_smollm2()
    moe = serving_moe(dense, tok, args.model)
    work = workload(moe, tok, args.requests, prompt=32, tokens=args.tokens)
    offloaded = copy.deepcopy(moe)
    cache = ExpertCache.offload(offloaded, tempfile.mkdtemp(prefix="hf_ext_experts_"), args.capacity, "lru")
    settings = {"all experts in RAM": (moe, None), f"{args.capacity} of 8 experts in RAM": (offloaded, cache)}
    serve(moe, work[:4], args.batch, None)                                        # warm-up
    runs = {(s, p): [] for s in settings for p in POLICIES}
    for _ in range(args.rounds):
        for s, (model, c) in settings.items():
            for p, kw in POLICIES.items():
                runs[s, p].append(serve(model, work, args.batch, c, **kw))
    sections = {}
    for s in settings:
        rows = []
        for p in POLICIES:
            row = {"policy": p, **{k: statistics.median(r[k] for r in runs[s, p]) for k in runs[s, p][0]}}
            base = {k: statistics.median(r[k] for r in runs[s, "fcfs"]) for k in runs[s, p][0]}
            row["mean_vs_fcfs"] = row["norm_latency_mean_ms"] / base["norm_latency_mean_ms"] - 1
            row["p95_vs_fcfs"] = row["norm_latency_p95_ms"] / base["norm_latency_p95_ms"] - 1
            rows.append(row)
            print(s, json.dumps(row), flush=True)
        sections[s] = {"note": f"{args.requests} held-out requests x {args.tokens} tokens, all queued at once; "
                               f"batch budget {args.batch} tokens; medians over {args.rounds} interleaved rounds. "
                               "Normalized latency = a request's finish time / its tokens.", "rows": rows}
    res = {"title": "Read-ME: expert-aware batching vs FCFS (SmolLM2-135M MoE, 8 experts)",
           "command": " ".join(["python benchmarks/moe_batching.py"] + sys.argv[1:]),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "sections": sections}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
