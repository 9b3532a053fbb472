"""Does MLA distillation converge every time? Recipes x lengths x seeds, each a fresh run from the same upcycle.

    python benchmarks/mla_distill_stability.py --recipes today --tokens 32768 --seeds 0 --mixed-precision bf16
    python benchmarks/mla_distill_stability.py --recipes today,hot --tokens 32768,65536,131072 --seeds 0,1,2,3,4

A recipe is a set of ``DistillConfig`` fields (``RECIPES``). Every run starts from the same training-free 6.4x
upcycle of SmolLM2-135M and reads the same training tokens in its own seeded order; the held-out perplexity
(python-docs:eval) is measured at the end. A run counts as diverged when its final perplexity is above the
upcycled model's (it ended worse than it started) or not finite. Only convergence is reported here, not
speed: runs may share the CPU.
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_ext.mla import UpcycleConfig, upcycle_to_mla  # noqa: E402
from hf_ext.mla.distill import DistillConfig, distill  # noqa: E402
from mla import add_data_args, load, ppl  # noqa: E402
from run_all import save_result  # noqa: E402

RECIPES = {
    "today": {},                                       # DistillConfig's defaults
    "hot": {"lr": 1e-3},                               # the learning rate of the GPU runs' instability, scaled up
    "cpu-curve": {"lr": 2e-4},                         # the lr of the fp32 CPU curve in BENCHMARKS.md
    "hotter": {"lr": 3e-3},
    "hot-no-warmup": {"lr": 1e-3, "warmup": 0.0},
    "gpu-batch": {"lr": 3e-4, "batch_size": 16, "seq_len": 512},   # the H200 runs' recipe (8k tokens a step)
}


def run(mla0, src, data, recipe: dict, tokens: int, seed: int, mixed_precision: str) -> dict:
    from accelerate import Accelerator

    mla = copy.deepcopy(mla0)
    cfg = DistillConfig(tokens=tokens, seed=seed, **recipe)
    log = distill(mla, src, data["train"][len(data["calib"]):], cfg, progress=False,
                  accelerator=Accelerator(mixed_precision=mixed_precision, cpu=True))
    final = ppl(mla.eval(), data["eval"])
    return {"tokens": tokens, "seed": seed, "steps": log["steps"], "loss_first": log["loss_first"],
            "loss_last": log["loss_last"], "ppl": final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(ap)
    ap.add_argument("--recipes", default="today")
    ap.add_argument("--tokens", default="32768")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--mixed-precision", default="bf16")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mla_distill_stability.json"))
    args = ap.parse_args()
    args.distill_tokens = max(args.distill_tokens, *map(int, args.tokens.split(",")))
    torch.manual_seed(0)
    src, data = load(args)
    mla0, _ = upcycle_to_mla(src, UpcycleConfig(kv_ratio=6.4), calib_ids=data["calib"], progress=False)
    start = ppl(mla0.eval(), data["eval"])
    sections = {}
    for name in args.recipes.split(","):
        rows = []
        for tokens in map(int, args.tokens.split(",")):
            for seed in map(int, args.seeds.split(",")):
                r = run(mla0, src, data, RECIPES[name], tokens, seed, args.mixed_precision)
                r["diverged"] = not math.isfinite(r["ppl"]) or r["ppl"] > start
                rows.append(r)
                print(name, r, flush=True)
        sections[f"recipe {name}"] = {"note": f"DistillConfig({RECIPES[name] or 'defaults'}), "
                                              f"{args.mixed_precision} autocast; upcycled ppl {start:.2f}.",
                                      "rows": rows}
    save_result(args.out, "MLA distillation stability (6.4x SmolLM2-135M)",
                f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", sections)


if __name__ == "__main__":
    main()
