"""How long to anneal the DeepSeek KV latent norm during distillation (hf_ext.mla.anneal.NORM_ANNEAL).

Chosen on held-out *training* text: 8192 tokens of python-docs:train that these runs never train on (they
read the tokens before them). python-docs:eval, where the docs' perplexities are measured, plays
no part in the choice.

    python benchmarks/mla_anneal.py                     # fractions 0, 0.25, 0.5, 0.75 at 32k tokens (~15 min)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mla import ppl  # noqa: E402
from mla_deepseek_cost import save_val_rows, split  # noqa: E402

from hf_ext.mla import UpcycleConfig, upcycle_to_mla  # noqa: E402
from hf_ext.mla.distill import DistillConfig, distill  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", default="32+32", help="kv_lora_rank+qk_rope_head_dim")
    ap.add_argument("--tokens", type=int, default=32768, help="distillation tokens per run")
    ap.add_argument("--fractions", default="0,0.25,0.5,0.75")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mla_anneal.json"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ext.zoo import resolve_model

    path = resolve_model(args.model)
    src = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib, train, val = split(AutoTokenizer.from_pretrained(path), args.tokens)
    r, d_r = map(int, args.shape.split("+"))
    rows = [{"norm_anneal": "source", "val_ppl": ppl(src, val)}]
    for frac in (float(f) for f in args.fractions.split(",")):
        torch.manual_seed(0)
        mla, _ = upcycle_to_mla(src, UpcycleConfig(kv_lora_rank=r, qk_rope_head_dim=d_r, target="deepseek_v3",
                                                      latent_norm_init="gain"),
                                calib_ids=calib, progress=False)
        t = time.perf_counter()
        log = distill(mla, src, train, DistillConfig(tokens=args.tokens, lr=2e-4, norm_anneal=frac), progress=False)
        rows.append({"norm_anneal": frac, "distill_tokens": log["tokens"], "val_ppl": ppl(mla.eval(), val),
                     "kl_last": log["loss_last"], "seconds": time.perf_counter() - t})
        print(rows[-1], flush=True)
    save_val_rows(args.out, f"Latent norm anneal length ({Path(args.model).name}, DeepSeek form {args.shape})",
                  "Anneal fraction on a train-split validation",
                  f"after {args.tokens} distillation tokens, lr 2e-4, the KV latent norm annealed from the identity "
                  f"over this fraction of the steps (0: gain init, trained as it starts).", rows)


if __name__ == "__main__":
    main()
