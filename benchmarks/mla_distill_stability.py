"""Does MLA distillation converge every time? Recipes x lengths x seeds, each a fresh run from the same upcycle.

    python benchmarks/mla_distill_stability.py --recipes default --tokens 32768 --seeds 0 --mixed-precision bf16
    python benchmarks/mla_distill_stability.py --recipes default,before-fix --tokens 32768,65536,131072 --seeds 0,1,2,3,4

A recipe is a set of ``DistillConfig`` fields (``RECIPES``). Every run starts from the same training-free 6.4x
upcycle of SmolLM2-135M and reads the same training tokens in its own seeded order; the held-out perplexity
(python-docs:eval, fp32) is measured at the end. Each row gives it, with the first, last and largest training
loss and the spike guard's restores. Only convergence is reported here, not speed: runs may share the CPU.
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
    "default": {},                                     # DistillConfig's defaults: lr 5e-4, warmup 10 steps, guard 3x
    "lr1e-3": {"lr": 1e-3},
    "before-fix": {"lr": 5e-4, "warmup_fraction": 0.05, "spike_guard": None},   # the defaults before #36
    "short-warmup": {"lr": 5e-4, "warmup_steps": 5},
    "cpu-curve": {"lr": 2e-4},                         # the lr of the fp32 CPU curve in BENCHMARKS.md
    "hotter": {"lr": 3e-3},                            # the smallest lr at which the old recipe broke down on CPU
    "hotter-before-fix": {"lr": 3e-3, "warmup_fraction": 0.05, "spike_guard": None},
    "hot-no-warmup": {"lr": 1e-3, "warmup_steps": 0, "spike_guard": None},
    "gpu-batch": {"lr": 3e-4, "batch_size": 16, "seq_len": 512},   # the H200 runs' batch (needs > 24 GB on CPU)
}


def config(recipe: dict, tokens: int, seed: int) -> DistillConfig:
    """``warmup_fraction`` stands for the old schedule: a warmup of that fraction of the run's steps."""
    recipe = dict(recipe)
    if "warmup_fraction" in recipe:
        per_step = recipe.get("seq_len", DistillConfig.seq_len) * recipe.get("batch_size", DistillConfig.batch_size)
        steps = tokens // per_step
        recipe["warmup_steps"] = math.ceil(recipe.pop("warmup_fraction") * steps)
    return DistillConfig(tokens=tokens, seed=seed, **recipe)


def run(mla0, src, data, recipe: dict, tokens: int, seed: int, mixed_precision: str) -> dict:
    from accelerate import Accelerator

    mla = copy.deepcopy(mla0)
    cfg = config(recipe, tokens, seed)
    log = distill(mla, src, data["train"][len(data["calib"]):], cfg, progress=False,
                  accelerator=Accelerator(mixed_precision=mixed_precision, cpu=True))
    final = ppl(mla, data["eval"])       # distill hands back the plain fp32 forward: no autocast here
    return {"tokens": tokens, "seed": seed, "steps": log["steps"], "warmup_steps": cfg.warmup_steps,
            "loss_first": log["loss_first"], "loss_last": log["loss_last"], "loss_max": max(log["losses"]),
            "restores": len(log["restores"]), "ppl": final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(ap)
    ap.add_argument("--recipes", default="default")
    ap.add_argument("--tokens", default="32768")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--mixed-precision", default="bf16")
    ap.add_argument("--measure", choices=["eval", "validation"], default="eval",
                    help="eval: python-docs:eval (the docs' figures); validation: the last 8192 tokens of "
                         "python-docs:train, which no run trains on (where recipes are chosen)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mla_distill_stability.json"))
    args = ap.parse_args()
    args.distill_tokens = max(args.distill_tokens, *map(int, args.tokens.split(",")))
    torch.manual_seed(0)
    src, data = load(args)
    if args.measure == "validation":
        from mla_deepseek_cost import split

        data["eval"] = split(data["tokenizer"], args.distill_tokens)[2]
    mla0, _ = upcycle_to_mla(src, UpcycleConfig(kv_ratio=6.4), calib_ids=data["calib"], progress=False)
    start = ppl(mla0.eval(), data["eval"])
    sections = {}
    for name in args.recipes.split(","):
        rows = []
        for tokens in map(int, args.tokens.split(",")):
            for seed in map(int, args.seeds.split(",")):
                r = run(mla0, src, data, RECIPES[name], tokens, seed, args.mixed_precision)
                rows.append(r)
                print(name, r, flush=True)
                sections[f"recipe {name}"] = {"note": f"DistillConfig({RECIPES[name] or 'defaults'}), "
                                                      f"{args.mixed_precision} autocast; ppl on {args.measure}; "
                                                      f"upcycled ppl {start:.2f}.", "rows": rows}
                save_result(args.out, "MLA distillation stability (6.4x SmolLM2-135M)",   # after every run
                            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                            sections)


if __name__ == "__main__":
    main()
