"""The myopic synthetic task over seeds: does vanilla pre-cache, and myopic stay trivial, on every seed?

    python benchmarks/myopic_seeds.py --seeds 0,1,2,3,4                       # the defaults, both models
    python benchmarks/myopic_seeds.py --recipes default --seeds 5,6 --models vanilla --out /tmp/choose.json

Each run is exactly ``hf-ext myopic synthetic --seed N --models M [recipe flags] --json`` (the row's
``command``), in this process. Runs are saved one by one and a run already in ``--out`` is skipped, so a
series can be stopped and resumed (``--rerun`` repeats them). The goal (issue 37), judged per seed:
vanilla normalized loss <= 0.1 with the layer-1 probe R^2 >= 0.8 (the layer where position s must compute
sin(10 x_s) for later positions), and myopic >= 0.9 x the trivial loss. Only losses are reported; runs may
share the CPU, so train_seconds is not a speed figure.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_ext.myopic.synthetic import MODELS, SyntheticConfig, run_synthetic  # noqa: E402
from run_all import save_result  # noqa: E402

RECIPES = {                       # SyntheticConfig fields the CLI exposes, as flags
    "default": {},
    "slow-ramp": {"curriculum": 0.6},          # the same budget, the frequency ramp at half the speed
    "steps40k": {"steps": 40000},               # twice the budget, the same ramp fraction
}
VANILLA_MAX, PROBE_MIN, MYOPIC_MIN_FRACTION = 0.1, 0.8, 0.9


def command(recipe: dict, seed: int, model: str) -> str:
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in recipe.items())
    return f"hf-ext myopic synthetic --seed {seed} --models {model}{flags} --json"


def run(name: str, seed: int, model: str) -> tuple[dict, list[float]]:
    """One run: its row, and its training-loss curve (4 decimals)."""
    cfg = SyntheticConfig(seed=seed, **RECIPES[name])
    r = run_synthetic(cfg, models=(model,))                        # a progress bar on stderr
    m = r[model]
    row = {"recipe": name, "seed": seed, "model": model, "normalized_loss": m["normalized_loss"],
           "trivial": r["trivial_normalized_loss"], "probe_r2_layer1": m["probe_r2_layer1"],
           "probe_r2_layer2": m["probe_r2_layer2"], "train_loss_last": m["train_loss_curve"][-1],
           "train_seconds": m["train_seconds"], "steps": cfg.steps, "command": command(RECIPES[name], seed, model)}
    row["goal_met"] = passes(row)
    return row, [round(x, 4) for x in m["train_loss_curve"]]


def passes(row: dict) -> bool:
    if row["model"] == "vanilla":
        return row["normalized_loss"] <= VANILLA_MAX and row["probe_r2_layer1"] >= PROBE_MIN
    return row["normalized_loss"] >= MYOPIC_MIN_FRACTION * row["trivial"]


def summary(rows: list[dict]) -> list[dict]:
    """Per recipe and model: seeds run, mean and worst loss, and on how many seeds the goal holds."""
    out = []
    for name in dict.fromkeys(r["recipe"] for r in rows):
        for model in MODELS:
            sel = [r for r in rows if r["recipe"] == name and r["model"] == model]
            if not sel:
                continue
            losses = [r["normalized_loss"] for r in sel]
            worst = max(sel, key=lambda r: r["normalized_loss"]) if model == "vanilla" else \
                min(sel, key=lambda r: r["normalized_loss"] / r["trivial"])
            out.append({"recipe": name, "model": model, "seeds": ",".join(str(r["seed"]) for r in sel),
                        "mean_loss": statistics.mean(losses), "worst_loss": worst["normalized_loss"],
                        "worst_seed": worst["seed"], "goal_met": f"{sum(r['goal_met'] for r in sel)}/{len(sel)}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="default", help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--models", default="vanilla,myopic")
    ap.add_argument("--rerun", action="store_true", help="repeat runs already in --out")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "myopic_seeds.json"))
    args = ap.parse_args()
    recipes, models = args.recipes.split(","), args.models.split(",")
    bad = [r for r in recipes if r not in RECIPES] + [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown recipe or model {bad}: recipes are {', '.join(RECIPES)}; models {', '.join(MODELS)}")
    import transformers

    transformers.logging.set_verbosity_error()
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = old.get("sections", {}).get("runs", {}).get("rows", [])
    curves = old.get("sections", {}).get("runs", {}).get("train_loss_curves", {})   # "recipe seed model": [...]
    for name in recipes:
        for seed in map(int, args.seeds.split(",")):
            for model in models:
                key = (name, seed, model)
                if not args.rerun and any((r["recipe"], r["seed"], r["model"]) == key for r in rows):
                    continue
                row, curves[" ".join(map(str, key))] = run(name, seed, model)
                rows = [r for r in rows if (r["recipe"], r["seed"], r["model"]) != key] + [row]
                rows.sort(key=lambda r: (list(RECIPES).index(r["recipe"]), r["seed"], MODELS.index(r["model"])))
                print(row, flush=True)
                sections = {"runs": {"note": __doc__.split("\n\n")[2].replace("\n", " "), "rows": rows,
                                     "summary": summary(rows), "train_loss_curves": curves}}
                save_result(out, "Myopic synthetic task over seeds", f"{platform.machine()}, "
                            f"{torch.get_num_threads()} threads", sections, recipes={k: RECIPES[k] for k in
                                                                               dict.fromkeys(r["recipe"] for r in rows)})


if __name__ == "__main__":
    main()
