"""MEFT accuracy on docs-sections vs LoRA and full fine-tuning, one loop, same data, seed and schedule.

    python benchmarks/meft_accuracy.py --out benchmarks/results/meft_accuracy.json

Each method runs ``hf_ext.meft.train.finetune`` (the loop behind ``hf-ext finetune meft``) on the real
MiniLM, trains on the docs-sections train split (capped per class), keeps the epoch with the best
accuracy on the dev split, and reports accuracy on the whole eval split (never seen in training, never
used to pick a setting). Learning rates are fixed before the run: 5e-5 for full FT (the BERT default);
2e-3 for LoRA and MEFT, because at 5e-4 both underfit (3-epoch train loss 1.7-1.8 vs 1.15 for full FT).

Other seeds get their own section, and an "Across seeds" section averages every method run on 2+ seeds:

    python benchmarks/meft_accuracy.py --seed 2 --runs "full FT" "MEFT3 (defaults)"
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path
from statistics import fmean, stdev

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.meft.train import FinetuneConfig, finetune  # noqa: E402

RUNS = {"full FT": dict(method="full", lr=5e-5), "LoRA r=8": dict(method="lora", lr=2e-3),
        "MEFT3 (defaults)": dict(method="meft", variant="meft3", lr=2e-3),
        "MEFT1 (defaults)": dict(method="meft", variant="meft1", lr=2e-3)}
SUMMARY = "Across seeds"
KEEP = ("lr", "lam", "beta", "trainable_params", "accuracy", "balanced_accuracy", "final_train_loss", "dev_accuracy_per_epoch",
        "selected_epoch", "train_seconds")


def _seed(section_name: str) -> int:
    return int(section_name.rsplit("seed ", 1)[1]) if ", seed " in section_name else 0


def seed_summary(sections: dict) -> dict | None:
    """Mean over every seed section of each method run on 2+ seeds, with its paired gap to full FT per seed."""
    per_seed = {_seed(n): {r["method"]: r for r in s["rows"]} for n, s in sections.items() if n != SUMMARY}
    rows = []
    for method in RUNS:
        seeds = sorted(s for s, rs in per_seed.items() if method in rs)
        if len(seeds) < 2:
            continue
        runs = [per_seed[s][method] for s in seeds]
        row = {"method": method, "seeds": ",".join(map(str, seeds)),
               "mean_accuracy": fmean(r["accuracy"] for r in runs),
               "mean_balanced_accuracy": fmean(r["balanced_accuracy"] for r in runs),
               "mean_best_dev": fmean(max(r["dev_accuracy_per_epoch"]) for r in runs)}
        paired = [s for s in seeds if "full FT" in per_seed[s]]
        if method != "full FT" and len(paired) >= 2:
            gaps = [100 * (per_seed[s][method]["accuracy"] - per_seed[s]["full FT"]["accuracy"]) for s in paired]
            row.update(paired_seeds=",".join(map(str, paired)), gap_points_per_seed=" ".join(f"{g:+.1f}" for g in gaps),
                       mean_gap_points=fmean(gaps), gap_std_error=stdev(gaps) / len(gaps) ** 0.5)
        rows.append(row)
    if not rows:
        return None
    return {"note": "Mean over the seed sections above, recomputed on every run. gap = accuracy minus full FT's on "
                    "the same seed, in points; std_error = sample std / sqrt(#seeds).", "rows": rows}


def _stored_sections(out: Path, command: str) -> dict:
    """The seed sections already in ``out``; refuses a file written by another schedule (e.g. other --epochs)."""
    if not out.is_file():
        return {}
    stored = json.loads(out.read_text())
    if stored["command"] != command:
        sys.exit(f"{out} holds results of `{stored['command']}`, not `{command}`; mixing schedules would corrupt "
                 "the seed summary. Pass another --out for this schedule.")
    return stored["sections"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-per-class", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0, help="seeds other than 0 get their own section of --out")
    ap.add_argument("--runs", nargs="*", default=list(RUNS),
                    help=f"subset of {list(RUNS)}; the other methods' rows are kept from --out (from_earlier_run)")
    ap.add_argument("--out", default="benchmarks/results/meft_accuracy.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    section = "MiniLM on docs-sections" + (f", seed {args.seed}" if args.seed else "")
    epochs = "" if args.epochs == 5 else f" --epochs {args.epochs}"
    command = f"python benchmarks/meft_accuracy.py{epochs}"
    _stored_sections(Path(args.out), command)   # fail now, not after an hour of training
    rows, common = [], None
    for name in args.runs:
        cfg = FinetuneConfig(model="minilm-l6", epochs=args.epochs, max_per_class=args.max_per_class, seed=args.seed,
                             **RUNS[name])
        _, _, r = finetune(cfg)
        common = {k: r[k] for k in ("train_examples", "eval_examples", "steps", "epochs", "batch_size", "max_length")}
        rows.append({"method": name, **{k: r[k] for k in KEEP}})
        print(json.dumps(rows[-1]), flush=True)
    sections = _stored_sections(Path(args.out), command)   # reread: other seeds' runs may have finished meanwhile
    if set(args.runs) != set(RUNS) and section in sections:   # a partial rerun keeps the other methods' rows
        done = {r["method"] for r in rows}
        kept = [{**r, "from_earlier_run": True} for r in sections[section]["rows"] if r["method"] not in done]
        rows = sorted(kept + rows, key=lambda r: list(RUNS).index(r["method"]) if r["method"] in RUNS else len(RUNS))
    full = next((r["accuracy"] for r in rows if r["method"] == "full FT"), None)
    for r in rows:
        if full is not None:
            r["accuracy_vs_full_points"] = 100 * (r["accuracy"] - full)
    note = (f"docs-sections (8 classes), real MiniLM-L6, {common['train_examples']} train paragraphs "
            f"(<= {args.max_per_class} per class), {common['eval_examples']} eval paragraphs (natural class mix; "
            f"majority class 53.5%), {common['epochs']} epochs x {common['steps'] // common['epochs']} steps of "
            f"{common['batch_size']}, max {common['max_length']} tokens, seed {args.seed}; the epoch is chosen on the "
            "dev split (1403 paragraphs, disjoint from train and eval). balanced_accuracy = mean per-class recall.")
    sections = {k: v for k, v in {**sections, section: {"note": note, "rows": rows}}.items() if k != SUMMARY}
    summary = seed_summary(sections)
    res = {"title": "MEFT: docs-sections accuracy vs LoRA and full fine-tuning" + (f", {args.epochs} epochs" if epochs else ""),
           "command": command,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "sections": {**sections, **({SUMMARY: summary} if summary else {})}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)   # atomic: never a half-written results file


if __name__ == "__main__":
    main()
