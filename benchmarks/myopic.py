"""Myopic training: step time and memory vs eager and sdpa, the synthetic task, the myopia gap.

    python benchmarks/myopic.py                      # all three parts
    python benchmarks/myopic.py --parts speed        # one part; the others keep their stored rows

speed: training steps (forward + backward) of the real SmolLM2-135M at batch 1 x 512, the three
attention implementations interleaved round-robin in one process; median seconds, ratio to eager,
bytes the autograd graph holds for backward (graph walk, deduplicated by storage) and, on CUDA, peak
memory. synthetic: ``hf-ext myopic synthetic`` with SyntheticConfig's CPU recipe (frequency curriculum;
the paper trained ~100M sequences at the fixed frequency). gap: ``hf-ext myopic gap`` (SmolLM2,
python-docs train/eval) at a CPU budget, myopic and local-myopic (w = 16).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.eval import tokenize  # noqa: E402
from hf_ext.meft.measure import saved_activation_bytes  # noqa: E402
from hf_ext.myopic import enable_myopic  # noqa: E402
from hf_ext.zoo import load_causal_lm, load_corpus  # noqa: E402

NOTES = {
    "exactness": "SmolLM2-135M, 12 tokens: relative L2 error over every parameter's gradient, one-pass myopic "
                 "attention vs the untied-parameters reference (ops.myopic_grads_naive).",
    "speed": "SmolLM2-135M, batch 1 x 512, fp32, one training step = forward + backward; median of the timed "
             "rounds (implementations interleaved). The official code needs two forward passes (about 2x).",
    "synthetic": "CPU budget (see steps, batch_size; the training frequency ramps 1 -> 10 over the first "
                 "`curriculum` of the steps, evaluation is at 10). "
                 "y_n = z_n * sum_{i=1..10} sin(10 x_{n-i}) + (1 - z_n) x_n; normalized loss = Huber / p on "
                 "held-out sequences; probe R^2 of sin(10 x_n) from the hidden state at n (held-out fit). "
                 "train_seconds: wall time on a shared machine, not a speed comparison.",
    "gap": "CPU budget: SmolLM2-135M fine-tuned for `steps` steps of 2 x 256 tokens (lr 3e-5) on "
           "python-docs:train; NLL (nats/token) on the first 8192 tokens of python-docs:eval; vanilla, myopic "
           "and local-myopic copies share data, order, schedule and seed.",
}


def speed(rounds: int) -> list[dict]:
    model, tok = load_causal_lm("smollm2-135m")
    ids = tokenize(tok, load_corpus("python-docs:train"), 512).view(1, 512)
    impls = {}
    for name in ("eager", "sdpa", "myopic"):
        m = copy.deepcopy(model).train()
        enable_myopic(m) if name == "myopic" else m.set_attn_implementation(name)
        impls[name] = m
    times = {n: [] for n in impls}
    mem = {}
    for r in range(rounds + 1):                                          # round 0 warms up
        for name, m in impls.items():
            m.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            if r == 0:
                mem[name] = saved_activation_bytes(loss, m)
            loss.backward()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    eager = statistics.median(times["eager"])
    rows = [{"attention": n, "step_s": statistics.median(t), "vs_eager": statistics.median(t) / eager,
             "saved_for_backward_MB": mem[n] / 2**20} for n, t in times.items()]
    for r in rows:
        print(r, flush=True)
    return rows


def exactness() -> list[dict]:
    """One-pass myopic gradients vs the untied-parameters reference on SmolLM2 (12 tokens)."""
    from hf_ext.myopic import myopic_grads_naive

    model, tok = load_causal_lm("smollm2-135m")
    model.set_attn_implementation("eager")
    ids = tokenize(tok, load_corpus("python-docs:eval"), 12).view(1, 12)

    def one_pass(m):
        enable_myopic(m)(ids, labels=ids).loss.backward()
        return {k: p.grad for k, p in m.named_parameters() if p.grad is not None}

    def rel(a, b):
        num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in b)
        return (num / sum(float(b[k].double().norm() ** 2) for k in b)) ** 0.5

    ref32 = myopic_grads_naive(copy.deepcopy(model), ids)
    ref64 = myopic_grads_naive(copy.deepcopy(model).double(), ids)
    g64 = one_pass(copy.deepcopy(model).double())
    rows = [{"compared": "one-pass fp64 vs reference fp64", "rel_grad_err": rel(g64, ref64)},
            {"compared": "one-pass fp32 vs reference fp64", "rel_grad_err": rel(one_pass(copy.deepcopy(model)), ref64)},
            {"compared": "reference fp32 vs reference fp64", "rel_grad_err": rel(ref32, ref64)}]
    for r in rows:
        print(r, flush=True)
    return rows


def synthetic(steps: int | None, batch: int | None) -> list[dict]:
    from hf_ext.myopic.synthetic import SyntheticConfig, run_synthetic

    given = {"steps": steps, "batch_size": batch}
    r = run_synthetic(SyntheticConfig(**{k: v for k, v in given.items() if v is not None}))
    rows = [{"model": "trivial (no past)", "normalized_loss": r["trivial_normalized_loss"]}]
    rows += [{"model": n, **r[n]} for n in ("vanilla", "myopic")]
    for row in rows:
        row.update({k: r["config"][k] for k in ("p", "steps", "batch_size", "seq_len", "lr", "curriculum")})
        print(row, flush=True)
    return rows


def gap(steps: int) -> list[dict]:
    from hf_ext.myopic.gap import GapConfig, myopia_gap

    rep, _ = myopia_gap(GapConfig(steps=steps, batch_size=2, seq_len=256, eval_tokens=8192, extra_local_windows=(16,)))
    rows = [{"model": "base (no fine-tuning)", "nll": rep["nll_base"]},
            {"model": "vanilla", "nll": rep["nll_vanilla"], "gap_nats": 0.0},
            {"model": "myopic", "nll": rep["nll_myopic"], "gap_nats": rep["gap_nats"]},
            {"model": "local myopic (w=16)", "nll": rep["nll_local16"], "gap_nats": rep["gap_local16_nats"]}]
    for r in rows:
        r.update(steps=steps, train_tokens=rep["train_tokens_seen"])
        print(r, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["exactness", "speed", "synthetic", "gap"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--synthetic-steps", type=int, help="default: SyntheticConfig's")
    ap.add_argument("--synthetic-batch", type=int, help="default: SyntheticConfig's")
    ap.add_argument("--gap-steps", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/myopic.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {"sections": {}}
    for part in args.parts:
        rows = {"speed": lambda: speed(args.rounds), "gap": lambda: gap(args.gap_steps), "exactness": exactness,
                "synthetic": lambda: synthetic(args.synthetic_steps, args.synthetic_batch)}[part]()
        res["sections"][part] = {"note": NOTES[part], "rows": rows}
    res.update(title="Myopic training: cost, the synthetic task, the myopia gap",
               command="python benchmarks/myopic.py",
               machine=f"{platform.machine()}, {torch.get_num_threads()} threads")
    order = [k for k in ("exactness", "speed", "synthetic", "gap") if k in res["sections"]]
    res["sections"] = {k: res["sections"][k] for k in order}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
