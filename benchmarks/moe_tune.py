"""Read-ME's alternating rounds on the real SmolLM2-135M, against static pruning and random routing.

    python benchmarks/moe_tune.py --cases readme,static,hash --top-p 0.5 --tokens 131072
    python benchmarks/moe_tune.py --cases readme --top-p 0.75,0.375 --tokens 131072
    python benchmarks/moe_tune.py --plot-only          # redraw the PNG from the JSON

Text: python-docs:train only (python-docs:eval is scored and never trained on), tokenized once:
- calibration: its first 16384 tokens (64 windows of 256): the expert masks (k-means on activation
  patterns, as `hf-ext convert moe` does without labels) and the static mask;
- tuning: the tokens after them, as an hf-ext token store of 256-token windows (``--store``, built once);
  the router rounds use its first 64 windows;
- validation: the last 8192 tokens (after a 16384-token gap), the y axis of the curve.
The final row scores python-docs:eval, 16384 tokens in windows of 256 (benchmarks/moe.py's protocol).

Cases, at the same top-p, tokens, optimiser and schedule (``hf_ext.moe.tune.TuneConfig``):
- readme: D experts, router rounds + expert rounds (``hf_ext.moe.tune``);
- static: structured pruning, one neuron mask for every token (top-p neurons by mean |activation| over all
  calibration tokens: the same statistics with one cluster), the MLPs tuned alike;
- hash: the readme experts, each token routed by a fixed random map of its token id (hash routing), tuned
  alike; the router is not used.
Rows accumulate in ``--out`` (a row is replaced when its case and top-p rerun), so cases can run in separate
processes; ``--png`` plots validation perplexity against tuning tokens for every row.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from moe import load_smollm2, nll  # noqa: E402

from hf_ext.moe import activation_stats, convert_to_pregated_moe, expert_masks, hits  # noqa: E402
from hf_ext.moe.router import error_scores, target_accuracy  # noqa: E402
from hf_ext.moe.tune import TuneConfig, tune  # noqa: E402

CALIB, VAL, GAP, SEQ = 16384, 8192, 16384, 256


def texts(tok, store: Path):
    """(calibration windows, validation windows, eval windows) as (n, 256) ids; writes the tuning store once."""
    from hf_ext.data import Field, StoreWriter
    from hf_ext.eval import tokenize
    from hf_ext.zoo import load_corpus

    cache = store.parent / f"{store.name}.ids.pt"                     # the whole tokenized split, kept beside
    if cache.exists():
        ids = torch.load(cache)
    else:
        ids = tokenize(tok, load_corpus("python-docs:train"))
        store.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ids, f"{cache}.{os.getpid()}")
        os.replace(f"{cache}.{os.getpid()}", cache)                       # atomic: parallel runs share it
    cut = lambda x: x[: len(x) // SEQ * SEQ].view(-1, SEQ)  # noqa: E731
    if not (store / "index.json").exists():
        with StoreWriter(store, [Field("input_ids", "uint16", (SEQ,))],
                         {"tokenizer": "smollm2-135m", "vocab_size": len(tok), "text": "python-docs:train",
                          "tokens": f"{CALIB}:{len(ids) - VAL - GAP}"}) as w:
            w.write_batch({"input_ids": cut(ids[CALIB:len(ids) - VAL - GAP]).to(torch.int32)})
    ev = tok(load_corpus("python-docs:eval", max_chars=16384 * 8), return_tensors="pt")["input_ids"][0][:16384]
    return cut(ids[:CALIB]), cut(ids[-VAL:]), cut(ev)


def build(case: str, dense, calib, top_p: float, experts: int):
    """(moe, route): the converted model, and the fixed routing of the hash case (None otherwise)."""
    batches = [{"input_ids": calib[i:i + 8]} for i in range(0, len(calib), 8)]
    torch.manual_seed(0)                                                  # the untrained router's initialisation
    if case == "static":
        labels = [torch.zeros(len(b["input_ids"]), dtype=torch.long) for b in batches]
        return convert_to_pregated_moe(dense, expert_masks(activation_stats(dense, batches, 1, labels), top_p)), None
    moe = convert_to_pregated_moe(dense, expert_masks(activation_stats(dense, batches, experts), top_p))
    if case == "hash":
        table = torch.randint(0, experts, (dense.config.vocab_size,), generator=torch.Generator().manual_seed(0))
        return moe, lambda ids: table[ids]
    return moe, None


def ppl(model, windows, route=None) -> float:
    return math.exp(nll(model, windows, None if route is None else [route(w) for w in windows]))


def update(out: Path, rows: list[dict], args) -> None:
    """Merge ``rows`` into ``out`` under a lock (several processes may share it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = json.loads(out.read_text()) if out.exists() else {
            "title": "Read-ME alternating rounds vs static pruning and hash routing (SmolLM2-135M)",
            "command": "", "machine": f"{platform.processor() or platform.machine()}",
            "sections": {"Perplexity": {"note": "", "rows": []}, "Expert cache hit rate": {"note": "", "rows": []}}}
        cmds = set(filter(None, res["command"].split(" ; "))) | {" ".join(["python benchmarks/moe_tune.py"] + sys.argv[1:])}
        res["command"] = " ; ".join(sorted(cmds))
        res["sections"]["Perplexity"]["note"] = (
            f"val_ppl: last {VAL} tokens of python-docs:train; eval_ppl: python-docs:eval, 16384 tokens, windows "
            f"of {SEQ}. Tuning: {args.tokens} tokens of python-docs:train per case ({args.rounds} rounds, lr "
            f"{args.lr}, batch 4 x {SEQ}); calibration: the first {CALIB} train tokens.")
        res["sections"]["Expert cache hit rate"]["note"] = (
            "the tuned readme model's router trace over the eval text (one expert per token, every layer); "
            "fraction of tokens whose expert was resident.")
        key = lambda x: (x.get("case"), x.get("top_p"), x.get("capacity"))  # noqa: E731
        ppl_sec = res["sections"]["Perplexity"]
        for r in rows:
            sec = res["sections"]["Expert cache hit rate" if "capacity" in r else "Perplexity"]
            sec["rows"] = [x for x in sec["rows"] if key(x) != key(r)] + [r]
            if "curve" in r:                              # the curve as its own table (run_all renders it)
                ppl_sec["curve"] = [x for x in ppl_sec.get("curve", []) if key(x) != key(r)] + [
                    {"case": r["case"], "top_p": r["top_p"], "tokens": t, "val_ppl": v} for t, v in r.pop("curve")]
        res["sections"]["Perplexity"]["rows"].sort(key=lambda x: (x["case"] != "dense", -x["top_p"], x["case"]))
        out.write_text(json.dumps(res, indent=1))


def plot(out: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sec = json.loads(out.read_text())["sections"]["Perplexity"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next((r for r in sec["rows"] if r["case"] == "dense"), None)
    for r in sec["rows"]:
        pts = [(c["tokens"], c["val_ppl"]) for c in sec.get("curve", []) if (c["case"], c["top_p"]) == (r["case"], r["top_p"])]
        if pts:
            t, p = zip(*pts)
            ax.plot([x / 1000 for x in t], p, marker="o", ms=3,
                    label=f"{r['case']}, {r['active_mlp_fraction']:.1%} of the MLP active")
    if dense:
        ax.axhline(dense["val_ppl"], color="k", ls="--", lw=1, label="dense SmolLM2-135M")
        ax.axhline(1.5 * dense["val_ppl"], color="gray", ls=":", lw=1, label="1.5x dense (goal)")
    ax.set(xlabel="tuning tokens (thousands)", ylabel="validation perplexity (python-docs:train, held out)",
           yscale="log", title="Read-ME rounds vs static pruning and hash routing")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="readme,static,hash")
    ap.add_argument("--top-p", default="0.5", help="comma list of fractions of each MLP a token uses")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=131072, help="tuning tokens per case")
    ap.add_argument("--rounds", type=int, default=TuneConfig.rounds)
    ap.add_argument("--lr", type=float, default=TuneConfig.lr)
    ap.add_argument("--val-points", type=int, default=4, help="validation points on the curve after the start")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--store", default=str(Path.home() / ".cache/hf_ext/stores/python-docs-train-smollm2-256"))
    ap.add_argument("--save", default=None, help="save the tuned readme model of the first top-p here")
    ap.add_argument("--out", default=str(HERE / "results" / "moe_tune.json"))
    ap.add_argument("--png", default=str(HERE / "results" / "moe_tune.png"))
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.plot_only:
        return plot(out, Path(args.png))
    if args.threads:
        torch.set_num_threads(args.threads)
    dense, tok = load_smollm2()
    calib, val, ev = texts(tok, Path(args.store))
    update(out, [{"case": "dense", "top_p": 1.0, "experts": 1, "active_mlp_fraction": 1.0, "tokens": 0,
                  "val_ppl": ppl(dense, val), "eval_ppl": ppl(dense, ev)}], args)
    for top_p in [float(p) for p in args.top_p.split(",")]:
        for case in args.cases.split(","):
            moe, route = build(case, dense, calib, top_p, args.experts)
            cfg = TuneConfig(tokens=args.tokens, rounds=args.rounds, lr=args.lr)
            steps = cfg.tokens // (cfg.seq_len * cfg.batch_size)
            every = max(1, steps // args.val_points)
            curve = [(0, ppl(moe, val, route))]
            print(json.dumps({"case": case, "top_p": top_p, "val_ppl_start": curve[0][1]}), flush=True)

            def on_step(step, tokens):
                if step % every == 0 or step == steps:
                    curve.append((tokens, ppl(moe, val, route)))
                    print(json.dumps({"case": case, "top_p": top_p, "tokens": tokens, "val_ppl": curve[-1][1]}),
                          flush=True)
            t0 = time.perf_counter()
            log = tune(moe, dense, args.store, cfg, route=route, on_step=on_step, progress=False)
            row = {"case": case, "top_p": top_p, "experts": moe.config.num_experts,
                   "active_mlp_fraction": moe.config.active_mlp_fraction, "tokens": log["tokens"],
                   "val_ppl_start": curve[0][1], "val_ppl": curve[-1][1], "eval_ppl": ppl(moe, ev, route),
                   "tune_seconds": log["seconds"], "tune_tokens_per_s": log["tokens_per_s"],
                   "wall_seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                   "kl_last": log["rounds"][-1].get("kl_last"), "curve": curve}
            routed = [r for r in log["rounds"] if "router_target_accuracy" in r]
            if routed:
                row["router_target_accuracy_train"] = routed[-1]["router_target_accuracy"]
                row["router_target_accuracy_eval"] = target_accuracy(
                    moe, [{"input_ids": ev[i:i + 4]} for i in range(0, len(ev), 4)],
                    error_scores(moe, dense, [{"input_ids": ev[i:i + 4]} for i in range(0, len(ev), 4)]))
            rows = [row]
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
            if case == "readme":
                trace = torch.cat([moe.route(w[None])[0] for w in ev]).tolist()
                rows += [{"case": case, "top_p": top_p, "experts": args.experts, "capacity": c,
                          "lru": hits(trace, c, "lru") / len(trace),
                          "belady_lookahead_16": hits(trace, c, "belady", lookahead=16) / len(trace),
                          "belady_full_trace": hits(trace, c, "belady") / len(trace)}
                         for c in range(1, args.experts)]
                if args.save and top_p == float(args.top_p.split(",")[0]):
                    moe.save_pretrained(args.save)
                    tok.save_pretrained(args.save)
            update(out, rows, args)
    plot(out, Path(args.png))


if __name__ == "__main__":
    main()
