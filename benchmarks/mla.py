"""MLA upcycling benchmark: quality vs KV ratio per init, distillation curve, cache memory, decode speed.

    python benchmarks/mla.py                                   # CPU, every section, real SmolLM2-135M
    python benchmarks/mla.py --sections speed,memory --device cuda --dtype bfloat16 \\
        --contexts 1024,4096,16384 --out benchmarks/results/mla_gpu.json

Held-out text is python-docs:eval (never used for calibration, distillation or choosing defaults;
defaults were chosen on a validation slice at the end of python-docs:train). Every comparison runs
side by side in one process; speed is reported as MLA / source ratios too.
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.eval import window_nll  # noqa: E402
from hf_ext.mla import UpcycleConfig, upcycle_to_mla  # noqa: E402
from hf_ext.mla.anneal import NORM_ANNEAL  # noqa: E402
from hf_ext.mla.distill import DistillConfig, distill  # noqa: E402
from hf_ext.mla.measure import decode_tokens_per_s, kv_bytes_per_token  # noqa: E402
from run_all import save_result  # noqa: E402

RATIOS = [2, 4, 6.4, 8, 10.6]
INITS = {  # name -> UpcycleConfig fields (kv size set per ratio)
    "mha2mla (per-KV-head RoPE, 2-norm, weight SVD)": dict(
        qk_rope_head_dim=8, rope_key_sharing="per_kv_head", rope_rotation="none", rope_selection="2norm",
        kv_init="svd", nope_rotation="none"),
    "mha2mla + whitened SVD": dict(
        qk_rope_head_dim=8, rope_key_sharing="per_kv_head", rope_rotation="none", rope_selection="2norm",
        kv_init="whitened", nope_rotation="none"),
    "rorope + 2-norm + whitened SVD (TransMLA-like)": dict(
        rope_selection="2norm", kv_init="whitened", nope_rotation="none"),
    "hf-ext default (rorope + qk_freq + mean rotation + qo-whitened)": dict(),
}


def ppl(model, ids, window=512):
    total, count, _ = window_nll(model, ids, window, progress=False)
    return math.exp(total / count)


def add_data_args(ap) -> None:
    """The options ``load`` reads: the model and the calibration / training / held-out token counts."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-init", action="store_true", help="real config, random weights (speed/memory only)")
    ap.add_argument("--ids", help="a torch file with calib/train/eval token ids (machines without the corpus)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--distill-tokens", type=int, default=131072, help="training tokens to load")


def load(args):
    from transformers import AutoModelForCausalLM

    if args.ids:
        data = {k: v.long() for k, v in torch.load(args.ids).items()}
        path = args.model
    else:
        from hf_ext.eval import tokenize
        from hf_ext.zoo import load_corpus, resolve_model

        path = resolve_model(args.model)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        data = {"calib": tokenize(tok, load_corpus("python-docs:train"), args.calib_tokens),
                "train": tokenize(tok, load_corpus("python-docs:train"), args.distill_tokens + 65536),
                "eval": tokenize(tok, load_corpus("python-docs:eval"), args.eval_tokens), "tokenizer": tok}
    if args.random_init:  # speed and memory do not depend on weight values: real shapes, random weights
        from transformers import AutoConfig

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, data


def section_quality(src, data, args, device):
    rows = [{"init": "source (no compression)", "kv_ratio": 1.0, "ppl": ppl(src, data["eval"])}]
    for name, kw in INITS.items():
        for ratio in RATIOS:
            t = time.perf_counter()
            try:
                mla, rep = upcycle_to_mla(src, UpcycleConfig(kv_ratio=ratio, **kw), calib_ids=data["calib"], progress=False)
                p = ppl(mla.to(device), data["eval"])
            except Exception as e:  # a ratio an init cannot reach is a result, not a crash
                rows.append({"init": name, "kv_ratio": ratio, "ppl": f"n/a ({str(e).split(';')[0]})"})
                continue
            rows.append({"init": name, "kv_ratio": round(rep["kv_ratio"], 2), "kv_lora_rank": rep["kv_lora_rank"],
                         "ppl": p, "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
    return {"note": f"Training-free held-out perplexity on {len(data['eval'])} python-docs:eval tokens "
                    f"(windows of 512), calibration {len(data['calib'])} python-docs:train tokens.", "rows": rows}


def section_ablation(src, data, args, device):
    """Where the training-free loss comes from: RoPE removal alone (full rank) vs low rank alone."""
    D, n_kv = src.config.head_dim, src.config.num_key_value_heads
    full = 2 * n_kv * D - 24  # every non-RoPE dim kept: only the 24-dim shared RoPE key approximates
    cases = {
        "RoPE removal only (full rank), mean rotation": dict(kv_lora_rank=full),
        "RoPE removal only (full rank), no mean rotation": dict(kv_lora_rank=full, nope_rotation="none"),
        "RoPE removal only (full rank), 2-norm selection, no mean rotation": dict(
            kv_lora_rank=full, rope_selection="2norm", nope_rotation="none"),
        "low rank only (r=36, every RoPE dim kept per KV head)": dict(
            kv_lora_rank=36, qk_rope_head_dim=D, rope_key_sharing="per_kv_head", rope_rotation="none",
            nope_rotation="none"),
    }
    rows = []
    for name, kw in cases.items():
        mla, rep = upcycle_to_mla(src, UpcycleConfig(**kw), calib_ids=data["calib"], progress=False)
        rows.append({"case": name, "kv_values_per_token": rep["kv_values_per_token"], "ppl": ppl(mla.to(device), data["eval"])})
        print(rows[-1], flush=True)
    return {"note": "Training-free held-out perplexity; each case isolates one approximation.", "rows": rows}


def ppl_plain(model, ids):
    """Perplexity through the model's class forward: outside an accelerator's autocast wrapper, if it has one."""
    wrapped = vars(model).pop("forward", None)          # accelerate puts its wrapper on the instance
    try:
        return ppl(model, ids)
    finally:
        if wrapped is not None:
            model.forward = wrapped


def section_distill(src, data, args, device):
    """The learning curve, with the mean training loss since the last mark beside each held-out perplexity.
    During training the held-out perplexity is measured twice: through the plain fp32 forward, and through
    the forward training uses (the accelerator's autocast, no-grad inference path). A broken training run
    shows in both and in the loss; a broken inference kernel only in ``ppl_autocast``."""
    mla, rep = upcycle_to_mla(src, UpcycleConfig(kv_ratio=6.4), calib_ids=data["calib"], progress=False)
    mla, src = mla.to(device), src.to(device)
    cfg = DistillConfig(tokens=args.distill_tokens, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                        **({"warmup_steps": args.warmup_steps} if args.warmup_steps is not None else {}))
    per_step = cfg.seq_len * cfg.batch_size
    steps = cfg.tokens // per_step
    marks = sorted({max(1, round(steps * f)) for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)})
    eval_ids = data["eval"].to(device)
    rows = [{"distill_tokens": 0, "step": 0, "ppl": ppl(mla, eval_ids)}]

    def on_step(step, tokens):
        if step in marks:
            mla.eval()
            rows.append({"distill_tokens": tokens, "step": step, "ppl": ppl_plain(mla, eval_ids),
                         "ppl_autocast": ppl(mla, eval_ids)})
            print(rows[-1], flush=True)

    from accelerate import Accelerator

    log = distill(mla, src, data["train"][len(data["calib"]):], cfg, progress=False, on_step=on_step,
                  accelerator=Accelerator(mixed_precision=args.mixed_precision, cpu=device == "cpu"))
    src_ppl = ppl(src, eval_ids)
    for r, prev in zip(rows[1:], rows):
        seen = log["losses"][prev["step"]: r["step"]]
        r["train_loss"] = sum(seen) / len(seen)
        r["max_grad_norm"] = max(log["grad_norms"][prev["step"]: r["step"]])
    for r in rows:
        r["ppl_over_source"] = r["ppl"] / src_ppl
    restores = "; ".join(f"step {e['step']}: loss {e['loss']:.3g} vs median {e['median']:.3g}, back to step "
                         f"{e['restored_step']}" for e in log["restores"]) or "none"
    return {"note": f"kv_ratio {rep['kv_ratio']:.2f}, default init, KL(teacher||student) on logits, only attention "
                    f"weights train; lr {cfg.lr}, warmup {cfg.warmup_steps} steps, {cfg.batch_size}x{cfg.seq_len} "
                    f"tokens/step, {log['tokens_per_s']:.0f} tokens/s, {log['seconds']:.0f} s on {device}; source ppl "
                    f"{src_ppl:.3f}; first loss {log['loss_first']:.3f}; spike-guard restores: {restores}.",
            "rows": rows}


def section_deepseek(src, data, args, device):
    """What the DeepSeek-V3 form costs, each constraint on its own, then after distillation."""
    from hf_ext.mla import save_deepseek_v3
    from hf_ext.mla.export import fold_identity_latents

    cases = {
        "hf-ext default (free RoPE pairs, no latent norms)": dict(),
        "+ geometric RoPE pairs (every c-th frequency)": dict(rope_selection="geometric"),
        "+ DeepSeek's latents as identities (latent_norm_init='identity', folded as exported)": dict(
            target="deepseek_v3"),
        "+ an active KV latent norm (latent_norm_init='gain')": dict(target="deepseek_v3", latent_norm_init="gain"),
    }
    shape = dict(kv_ratio=6.4)
    if args.deepseek_shape:                             # e.g. "32+32": kv_lora_rank + qk_rope_head_dim
        r, d_r = map(int, args.deepseek_shape.split("+"))
        shape = dict(kv_lora_rank=r, qk_rope_head_dim=d_r)
    exported = lambda m: m if m.config.latent_norm else fold_identity_latents(m)   # noqa: E731
    rows, models = [{"case": "source", "ppl": ppl(src, data["eval"])}], {}
    for name, kw in cases.items():
        mla, rep = upcycle_to_mla(src, UpcycleConfig(**shape, **kw), calib_ids=data["calib"], progress=False)
        m = exported(mla) if kw.get("target") else mla
        rows.append({"case": name, "kv_ratio": round(rep["kv_ratio"], 2), "rope_stride": rep.get("rope_stride"),
                     "distill_tokens": 0, "ppl": ppl(m.to(device), data["eval"])})
        models[kw.get("latent_norm_init", "identity") if kw.get("target") else name] = mla
        print(rows[-1], flush=True)
    for form in [f for f in args.deepseek_distill.split(",") if f] if args.distill_tokens else []:
        mla = copy.deepcopy(models[form])
        cfg = DistillConfig(tokens=args.distill_tokens, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr)
        log = distill(mla, src, data["train"][len(data["calib"]):], cfg, progress=False)
        label = {"identity": "DeepSeek form, identity latents, distilled without them, then folded",
                 "gain": f"DeepSeek form, active KV norm, distilled (annealed in over {NORM_ANNEAL:.0%} of the steps)"}
        row = {"case": label[form], "kv_ratio": rows[-1]["kv_ratio"], "distill_tokens": log["tokens"]}
        if form == "identity":
            row["ppl_before_folding"] = ppl(mla.eval(), data["eval"])
        rows.append({**row, "ppl": ppl(exported(mla.eval()), data["eval"])})
        print(rows[-1], flush=True)
        if args.save_deepseek and form == args.deepseek_distill.split(",")[0]:
            save_deepseek_v3(mla, args.save_deepseek, tokenizer=data.get("tokenizer"), overwrite=True)
    for r in rows:
        r["ppl_over_source"] = r["ppl"] / rows[0]["ppl"]
    at = f"kv_lora_rank+rope {args.deepseek_shape}" if args.deepseek_shape else "6.4x"
    return {"note": f"Held-out perplexity at {at}: training-free, one DeepSeek-V3 constraint at a time (each row adds "
                    f"to the one above, DeepSeek forms measured as exported), then distilled ({args.distill_tokens} "
                    f"tokens, lr {args.lr}, attention only). 'identity': the model trains with no latent norms and the "
                    f"export folds in identity ones (hf_ext.mla.export.fold_identity_latents).", "rows": rows}


def section_memory(src, data, args, device):
    mla, rep = upcycle_to_mla(src, UpcycleConfig(kv_ratio=6.4), calib_ids=data["calib"], progress=False)
    prompt = data["eval"][:64][None]
    b_src, b_mla = kv_bytes_per_token(src, prompt), kv_bytes_per_token(mla, prompt)
    budget = 8 * 2 ** 30
    rows = [{"model": "source (DynamicCache)", "kv_bytes_per_token_per_layer": b_src},
            {"model": "MLA 6.4x (MLALatentLayer)", "kv_bytes_per_token_per_layer": b_mla},
            {"model": "ratio source / MLA", "kv_bytes_per_token_per_layer": b_src / b_mla}]
    L = src.config.num_hidden_layers
    batch_rows = [{"model": m, "context": 16384, "max_batch_in_8GiB_cache": int(budget // (b * L * 16384))}
                  for m, b in (("source", b_src), ("MLA 6.4x", b_mla))]
    return {"note": "Bytes measured on the cache tensors generate() leaves behind (fp32). Max batch: the largest "
                    "batch whose measured cache fits an 8 GiB budget at 16k context.", "rows": rows + batch_rows}


SPEED_SETUPS = {"eager, dynamic cache": dict(), "compiled, static cache": dict(static=True, compiled=True)}


def section_speed(src, data, args, device):
    """Decode tokens/s of the source and MLA 6.4x, each in each setup; the ratio of each model's best."""
    dtype = getattr(torch, args.dtype)
    mla, _ = upcycle_to_mla(src, UpcycleConfig(kv_ratio=6.4), calib_ids=data["calib"], progress=False)
    models = {"source": src.to(device, dtype), "mla": mla.to(device, dtype)}
    setups = {k: v for k, v in SPEED_SETUPS.items() if k.split(",")[0] in args.speed_setups.split(",")}
    rows = []
    for batch in [int(b) for b in args.speed_batches.split(",")]:
        for ctx in [int(c) for c in args.contexts.split(",")]:
            row = {"context": ctx, "batch": batch}
            for name, m in models.items():
                for setup, kw in setups.items():
                    row[f"{name}, {setup}"] = decode_tokens_per_s(m, ctx, args.new_tokens, batch, device, **kw)
            best = {name: max(row[f"{name}, {s}"] for s in setups) for name in models}
            row["mla_over_source (each at its best)"] = best["mla"] / best["source"]
            rows.append(row)
            print(rows[-1], flush=True)
    return {"note": f"Greedy decode tokens/s (all rows of the batch), median of 3 runs of {args.new_tokens} tokens, "
                    f"{args.dtype} on {device}, after a cache of `context` random states (hf_ext.mla.measure."
                    f"filled_cache: speed depends on the cache's shapes, not its values). MLA decodes absorbed over "
                    f"its latent cache. Compiled: torch.compile(fullgraph, static shapes) of the decode step over a "
                    f"StaticCache, compile time excluded.", "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(ap)
    ap.add_argument("--sections", default="quality,distill,memory,speed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, help="default: DistillConfig's")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--speed-batches", default="1")
    ap.add_argument("--speed-setups", default="eager,compiled", help="speed: eager (dynamic cache) and/or compiled "
                    "(static cache)")
    ap.add_argument("--deepseek-shape", help="deepseek section: kv_lora_rank+qk_rope_head_dim, e.g. 32+32 "
                    "(default: kv_ratio 6.4)")
    ap.add_argument("--deepseek-distill", default="identity,gain",
                    help="deepseek section: the forms to distil (identity, gain); the first is saved by --save-deepseek")
    ap.add_argument("--save-deepseek", help="deepseek section: save the distilled DeepSeek-V3 checkpoint here")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mla.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    src, data = load(args)
    sections = {}
    titles = {"quality": "Quality vs KV ratio (training-free)", "distill": "Distillation at 6.4x",
              "ablation": "Ablation: where the training-free loss comes from",
              "deepseek": "The DeepSeek-V3 form",
              "memory": "KV-cache memory", "speed": "Decode speed"}
    for name in args.sections.split(","):
        t = time.perf_counter()
        sections[titles[name]] = globals()[f"section_{name}"](src, data, args, args.device)
        print(f"[{name}] {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    title = f"MLA upcycling of {Path(args.model).name} ({args.device}{', random-init weights' if args.random_init else ''})"
    save_result(args.out, title, gpu or f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                sections)


if __name__ == "__main__":
    main()
