"""Read-ME on the real SmolLM2-135M: perplexity of the pre-gated MoE, and expert-cache hit rates.

    python benchmarks/moe.py --out benchmarks/results/moe.json

Calibration and router training use the docs-sections *train* split (paragraphs of the Python docs,
``--per-class`` per section, at most 128 tokens): the D = 8 experts come from the 8 section labels, the
D = 4 experts from k-means on the activation patterns (the data has 8 labels, not 4). Top-p 0.5, so a token
uses half of every MLP. Perplexity is on ``python-docs:eval`` (held-out files, never used above), windows of
256 tokens. Rows: dense; MoE with the untrained router; MoE after router training (0.75 CE + 0.25 KL,
accelerate); MoE with oracle routing (each eval token's target expert, computed from the dense model, an
upper bound for any router). The alternating rounds that tune the experts are measured by
benchmarks/moe_tune.py. Cache: the trained router's expert trace of the eval text, one stream; hit
rate of no cache, LRU, Belady seeing the next 16 tokens, and Belady seeing the whole trace, at capacity 1..D-1.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.moe import activation_stats, convert_to_pregated_moe, expert_masks, hits  # noqa: E402
from hf_ext.moe.router import overlap_scores, target_accuracy, train_router  # noqa: E402


def load_smollm2():
    """SmolLM2-135M and its tokenizer (padding with EOS), transformers' warnings off."""
    import transformers

    from hf_ext.zoo import load_causal_lm

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    dense, tok = load_causal_lm("smollm2-135m")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return dense, tok


def calibration_batches(tok, per_class: int, batch: int = 16):
    from collections import Counter

    from hf_ext.tasks import load_task

    # the first `per_class` train paragraphs of each section in file order (the set the README's figures used)
    task, seen, first = load_task("docs-sections", "train"), Counter(), []
    for i, y in enumerate(task.labels):
        seen[y] += 1
        if seen[y] <= per_class:
            first.append(i)
    order = sorted(first, key=lambda i: task.labels[i])
    batches, labels = [], []
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        enc = tok([task.texts[j] for j in idx], return_tensors="pt", padding=True, truncation=True, max_length=128)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        labels.append(torch.tensor([task.labels[j] for j in idx]))
    return batches, labels


@torch.no_grad()
def nll(model, windows: torch.Tensor, expert_ids: list[torch.Tensor] | None = None) -> float:
    total, count = 0.0, 0
    for k, w in enumerate(windows):
        x = w[None]
        out = model(x, expert_ids=expert_ids[k][None]) if expert_ids is not None else model(x)
        lp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        total -= float(lp.gather(1, w[1:, None]).sum())
        count += len(w) - 1
    return total / count


def main():
    from hf_ext.zoo import load_corpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=48, help="docs-sections train paragraphs per section")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--router-epochs", type=int, default=8)
    ap.add_argument("--experts", type=int, nargs="*", default=[4, 8], help="D values (4: k-means, 8: section labels)")
    ap.add_argument("--out", default="benchmarks/results/moe.json")
    args = ap.parse_args()
    dense, tok = load_smollm2()
    batches, labels = calibration_batches(tok, args.per_class)
    train_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    ids = tok(load_corpus("python-docs:eval", max_chars=args.eval_tokens * 8), return_tensors="pt")["input_ids"][0]
    ids = ids[:args.eval_tokens - args.eval_tokens % 256]
    windows = ids.view(-1, 256)
    t0 = time.perf_counter()
    dense_nll = nll(dense, windows)
    mlp_params = sum(p.numel() for layer in dense.model.layers for p in layer.mlp.parameters())
    rows = [{"model": "dense SmolLM2-135M", "experts": 1, "ppl": math.exp(dense_nll), "active_mlp_fraction": 1.0,
             "active_mlp_params": mlp_params}]
    cache_rows = []
    for D in args.experts:
        stats = activation_stats(dense, batches, clusters=D, labels=labels if D == 8 else None)
        masks = expert_masks(stats, top_p=0.5)
        moe = convert_to_pregated_moe(dense, masks).eval()
        frac = moe.config.active_mlp_fraction
        base = {"experts": D, "clusters": "section labels" if D == 8 else "k-means", "active_mlp_fraction": frac,
                "active_mlp_params": round(frac * mlp_params)}
        rows.append({"model": "MoE, untrained router", **base, "ppl": math.exp(nll(moe, windows))})
        scores = overlap_scores(dense, masks, batches)
        train_router(moe, batches, scores, epochs=args.router_epochs, progress=False)
        eval_scores = overlap_scores(dense, masks, [{"input_ids": w[None]} for w in windows])
        routed = [moe.route(w[None])[0] for w in windows]
        acc = sum(int((a == s[0].argmax(-1)).sum()) for a, s in zip(routed, eval_scores)) / windows.numel()
        rows.append({"model": "MoE, trained router", **base, "ppl": math.exp(nll(moe, windows)),
                     "router_train_tokens": train_tokens, "router_epochs": args.router_epochs,
                     "router_target_accuracy_train": target_accuracy(moe, batches, scores),
                     "router_target_accuracy_eval": acc})
        rows.append({"model": "MoE, oracle routing", **base,
                     "ppl": math.exp(nll(moe, windows, [s[0].argmax(-1) for s in eval_scores]))})
        for row in rows[-3:]:
            print(json.dumps(row), flush=True)
        trace = torch.cat(routed).tolist()
        for cap in range(1, D):
            cache_rows.append({"experts": D, "capacity": cap, "none": 0.0, "lru": hits(trace, cap, "lru") / len(trace),
                               "belady_lookahead_16": hits(trace, cap, "belady", lookahead=16) / len(trace),
                               "belady_full_trace": hits(trace, cap, "belady") / len(trace)})
            print(json.dumps(cache_rows[-1]), flush=True)
    title = "Read-ME: pre-gated MoE from SmolLM2-135M"
    res = {"title": title, "command": " ".join(["python benchmarks/moe.py"] + sys.argv[1:]),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "sections": {
               "Perplexity": {"note": f"python-docs:eval, {windows.numel()} tokens in windows of 256; top-p 0.5; router "
                                      f"trained on {train_tokens} tokens of docs-sections train ({args.per_class} "
                                      f"paragraphs per section); {time.perf_counter() - t0:.0f} s in all.", "rows": rows},
               "Expert cache hit rate": {"note": "the trained router's expert trace over the eval text (one expert per "
                                                 "token, every layer); fraction of tokens whose expert was resident.",
                                         "rows": cache_rows}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
