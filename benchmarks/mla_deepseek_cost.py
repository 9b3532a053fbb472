"""What each DeepSeek-V3 constraint costs *after* distillation, measured on a train-split validation.

The DeepSeek-V3 form differs from our free MLA in two places (hf_ext.mla.export): the kept RoPE frequencies
must be a geometric series (every c-th), and the KV latent passes an RMSNorm before it is cached. Training-free,
both are visible in benchmarks/mla.py's deepseek section; this script distils each form for the same budget
and splits the gap between them, so that effort goes to the constraint that costs.

Validation: 8192 tokens at the end of python-docs:train that no run trains on (the same split as
benchmarks/mla_anneal.py). python-docs:eval, where the docs' perplexities are measured, plays no part.

    python benchmarks/mla_deepseek_cost.py                          # 3 forms x 131k tokens (~45 min on 2 cores)
    python benchmarks/mla_deepseek_cost.py --cases geometric --tokens 32768
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mla import ppl  # noqa: E402
from run_all import save_result  # noqa: E402

from hf_ext.mla import UpcycleConfig, upcycle_to_mla  # noqa: E402
from hf_ext.mla.distill import DistillConfig, distill  # noqa: E402

CASES = {  # name -> (UpcycleConfig fields, DistillConfig fields)
    "free": ("free RoPE pairs (qk_freq), no latent norm", dict(), dict()),
    "geometric": ("geometric RoPE pairs, no latent norm", dict(rope_selection="geometric"), dict()),
    "deepseek": ("DeepSeek-V3 form (geometric RoPE, KV latent norm, gain init)",
                 dict(target="deepseek_v3", latent_norm_init="gain"), dict(norm_anneal=0.0)),
    "deepseek-anneal": ("DeepSeek-V3 form, norm annealed from the identity",
                        dict(target="deepseek_v3", latent_norm_init="gain"), dict(norm_anneal=None)),
}


VAL_TOKENS = 8192


def split(tok, tokens: int, calib_n=16384, val_n=VAL_TOKENS):
    """As benchmarks/mla.py: calibration, then the distillation window (tokens + 49152), 16k unused, then val."""
    from hf_ext.eval import tokenize
    from hf_ext.zoo import load_corpus

    ids = tokenize(tok, load_corpus("python-docs:train"), calib_n + tokens + 65536 + val_n)
    return ids[:calib_n], ids[calib_n:calib_n + tokens + 49152], ids[-val_n:]


def save_val_rows(out: str, title: str, section: str, note: str, rows: list[dict]) -> None:
    """Add each row's val_ppl / the first (source) row's, then write the result with this machine's name."""
    for row in rows:
        row["val_ppl_over_source"] = row["val_ppl"] / rows[0]["val_ppl"]
    save_result(out, title, f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                {section: {"note": f"Perplexity on the last {VAL_TOKENS} tokens of python-docs:train (never trained "
                                   f"on), {note}", "rows": rows}})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", default="32+32", help="kv_lora_rank+qk_rope_head_dim")
    ap.add_argument("--tokens", type=int, default=131072, help="distillation tokens per run")
    ap.add_argument("--cases", default="free,geometric,deepseek", help=f"any of {','.join(CASES)}")
    ap.add_argument("--lr", type=float, default=2e-4, help="distillation peak learning rate")
    ap.add_argument("--seq-len", type=int, default=256, help="distillation window (tokens per step stay 1024)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mla_deepseek_cost.json"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ext.zoo import resolve_model

    path = resolve_model(args.model)
    src = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib, train, val = split(AutoTokenizer.from_pretrained(path), args.tokens)
    r, d_r = map(int, args.shape.split("+"))
    rows = [{"form": "source", "val_ppl": ppl(src, val)}]
    for key in args.cases.split(","):
        label, ukw, dkw = CASES[key]
        torch.manual_seed(0)
        mla, rep = upcycle_to_mla(src, UpcycleConfig(kv_lora_rank=r, qk_rope_head_dim=d_r, **ukw),
                                  calib_ids=calib, progress=False)
        before = ppl(mla, val)
        t = time.perf_counter()
        log = distill(mla, src, train, DistillConfig(tokens=args.tokens, lr=args.lr, seq_len=args.seq_len,
                                                       batch_size=1024 // args.seq_len, **dkw), progress=False)
        rows.append({"form": label, "rope_stride": rep.get("rope_stride"), "val_ppl_training_free": before,
                     "distill_tokens": log["tokens"], "val_ppl": ppl(mla.eval(), val), "kl_last": log["loss_last"],
                     "seconds": time.perf_counter() - t})
        print(rows[-1], flush=True)
    save_val_rows(args.out, f"Cost of each DeepSeek-V3 constraint after distillation ({Path(args.model).name}, "
                  f"{args.shape})", "Distilled forms on a train-split validation",
                  f"training-free and after {args.tokens} distillation tokens (lr {args.lr}, windows of {args.seq_len}, "
                  f"1024 tokens per step, attention only, logits KL), kv_lora_rank+rope {args.shape}.", rows)


if __name__ == "__main__":
    main()
