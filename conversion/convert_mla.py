"""`hf-ext convert mla`: upcycle a Llama-family checkpoint to MLA, optionally distil, verify, save, push."""
from __future__ import annotations

import sys

from .common import add_command, add_field, add_eval_args, add_json_arg, add_output_args, emit, load_source, maybe_push


def add_parser(sub) -> None:
    add_command(sub, "mla", "upcycle attention to Multi-head Latent Attention (latent KV cache)", arguments, run)


def arguments(p) -> None:
    from hf_ext.mla import UpcycleConfig as U
    from hf_ext.mla.distill import DistillConfig as D

    p.add_argument("--model", default="smollm2-135m", help="zoo name, local folder or Hub repo id")
    g = p.add_mutually_exclusive_group()
    add_field(g, U, "kv_ratio", type=float, help="target KV compression vs the source (default 6.4; with "
              "--target deepseek_v3, the widest llama.cpp-friendly latent at >= 6x, 32 + 32 on SmolLM2)")
    add_field(g, U, "kv_lora_rank", type=int, help="latent width r")
    add_field(g, U, "energy", type=float, help="smallest rank keeping this energy fraction")
    g.add_argument("--lossless", action="store_true", help="full rank, every RoPE dim: reproduces the source")
    p.add_argument("--qk-rope-head-dim", "--rope-dim", type=int, dest="qk_rope_head_dim",
                   help="RoPE dims per head, even (default 24; 32 with --target deepseek_v3)")
    add_field(p, U, "rope_key_sharing", "--rope-sharing", choices=["shared", "per_kv_head"])
    add_field(p, U, "rope_rotation", choices=["auto", "rorope", "none"],
              help="auto: rorope for shared keys on sources without per-head q/k norms, else none")
    add_field(p, U, "rope_selection", choices=["qk_freq", "2norm", "high_freq", "geometric"],
              help="with --target deepseek_v3, qk_freq becomes geometric (every c-th frequency)")
    add_field(p, U, "target", "--format", choices=["hf_ext", "deepseek_v3"],
              help="hf_ext: our MLAForCausalLM (remote code); deepseek_v3: a stock DeepseekV3ForCausalLM "
                   "checkpoint (no Python files) for transformers, llama.cpp, vLLM and SGLang")
    add_field(p, U, "latent_norm_init", choices=["identity", "gain"],
              help="deepseek_v3: DeepSeek's latent norms as identities, folded in at export after training without "
                   "them (identity: 1.31x better after distillation), or an active KV norm trained in the model (gain)")
    p.add_argument("--llamacpp", choices=["auto", "off"], default="auto",
                   help="deepseek_v3: also measure the source and the export in llama.cpp (f16 perplexity, KV "
                        "cache at 16k) when a build is present (auto, default), else say how to build one")
    add_field(p, U, "kv_init", choices=["qo_whitened", "whitened", "svd"])
    add_field(p, U, "nope_rotation", choices=["mean", "none"])
    add_field(p, U, "key_weight", help="key vs value error weight")
    p.add_argument("--calib-text", default="python-docs:train", help="calibration text (default python-docs:train)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--distill-tokens", type=int, default=0, help="distillation tokens after upcycling (default 0)")
    p.add_argument("--train-text", default="python-docs:train", help="distillation text (default python-docs:train)")
    p.add_argument("--train-store", help="distil on an hf-ext token store instead of --train-text "
                   "(`hf-ext data tokens --window SEQ_LEN`): memory-mapped, read by the fast loader")
    add_field(p, D, "lr", help="distillation peak learning rate (chosen on a train-split validation)")
    add_field(p, D, "warmup_steps", help="linear warmup, in optimiser steps (not a fraction of the run)")
    add_field(p, D, "spike_guard", type=float, help="restore the last good state and halve the lr when a step's loss "
              "exceeds this multiple of the recent median (0: off)")
    add_field(p, D, "seq_len")
    add_field(p, D, "batch_size")
    add_field(p, D, "checkpoint_dir", help="save/resume distillation state here")
    add_field(p, D, "norm_anneal", type=float,
              help="deepseek_v3: the fraction of distillation steps over which the KV latent norm goes from the "
                   "identity to DeepSeek's (default 0.5 with latent norms; 0 trains it as it starts)")
    add_output_args(p)
    add_eval_args(p)
    add_json_arg(p)


def run(args) -> None:
    from hf_ext.eval import perplexity, tokenize
    from hf_ext.hub import render_card, save_converted
    from hf_ext.mla import UpcycleConfig, upcycle_to_mla
    from hf_ext.mla.distill import DistillConfig, distill
    from hf_ext.mla.measure import conversion_figures
    from hf_ext.mla.upcycle_config import resolve_target_dims
    from hf_ext.zoo import HUB_IDS, load_corpus

    store = None
    if args.train_store and args.distill_tokens > 0:
        from hf_ext.data import ShardedDataset

        store = ShardedDataset(args.train_store)  # a missing or incomplete store fails before the model loads
    eval_text, model, tok = load_source(args)
    if args.lossless:
        ucfg = UpcycleConfig.lossless(model.config)
    else:
        ucfg = resolve_target_dims(model.config, **{k: getattr(args, k) for k in (
            "kv_ratio", "kv_lora_rank", "energy", "qk_rope_head_dim", "rope_key_sharing", "rope_selection",
            "rope_rotation", "kv_init", "nope_rotation", "key_weight", "target", "latent_norm_init")})
    calib = tokenize(tok, load_corpus(args.calib_text), args.calib_tokens) if ucfg.needs_calibration() else None
    mla, report = upcycle_to_mla(model, ucfg, calib_ids=calib)
    ev = dict(max_tokens=args.max_tokens, window=args.window)
    figures = conversion_figures(model, mla, tok, eval_text, **ev)
    result = {"model": args.model, **{k: report[k] for k in ("kv_values_per_token_source", "kv_values_per_token", "kv_ratio")},
              "ppl_source": figures["ppl_source"], "ppl_upcycled": figures["ppl_upcycled"],
              "ppl_converted": figures["ppl_upcycled"], "distill_tokens": 0}
    if args.distill_tokens > 0:
        train_ids = store or tokenize(tok, load_corpus(args.train_text), args.distill_tokens + args.calib_tokens)
        log = distill(mla, model, train_ids, DistillConfig(tokens=args.distill_tokens, seq_len=args.seq_len,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      spike_guard=args.spike_guard or None, checkpoint_dir=args.checkpoint_dir,
                      norm_anneal=args.norm_anneal))
        result.update(ppl_converted=perplexity(mla, tok, eval_text, **ev)["ppl"], distill_tokens=log["tokens"],
                      distill_seconds=log["seconds"], distill_tokens_per_s=log["tokens_per_s"],
                      distill_lr=args.lr, distill_warmup_steps=args.warmup_steps, distill_restores=len(log["restores"]),
                      **({"norm_anneal": log["norm_anneal"]} if log["norm_anneal"] else {}))
    result.update({k: figures[k] for k in ("kv_bytes_per_token_source", "kv_bytes_per_token")})
    result.update({k: report[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "rope_key_sharing", "rope_rotation",
                                          "rope_selection", "kv_init", "calib_tokens", "energy_kept_mean")})
    result.update({k: report[k] for k in ("rope_stride", "latent_norm_init") if k in report}, format=args.target)
    result.update(eval_text=args.eval_text, eval_tokens=args.max_tokens, window=args.window)
    if args.target == "deepseek_v3":
        if not mla.config.latent_norm:                     # what the export writes: DeepSeek's latents, as identities
            from hf_ext.mla.export import fold_identity_latents

            mla = fold_identity_latents(mla)
            result.update(ppl_before_folding=result["ppl_converted"],
                          ppl_converted=perplexity(mla, tok, eval_text, **ev)["ppl"])
        out = save_deepseek(args, mla, tok, eval_text, ev, result)
    else:
        card = render_card("mla", base_model=HUB_IDS.get(args.model, str(args.model)), base_model_relation="finetune",
                           metrics=result, tags=["mla", "kv-cache-compression"], model_name=f"{args.model} MLA "
                           f"(KV cache {result['kv_ratio']:.1f}x smaller)")
        out = save_converted(mla, args.out, tokenizer=tok, card=card, overwrite=args.overwrite, report=result)
    url = maybe_push(args, out)
    if url:
        result["pushed"] = url
    print(f"saved {out}", file=sys.stderr)
    emit({**result, "out": str(out)}, args.json)


def save_deepseek(args, mla, tok, eval_text, ev, result):
    """Write the DeepSeek-V3 checkpoint, then verify it: reload it with stock transformers and measure."""
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from hf_ext.eval import perplexity
    from hf_ext.hub import check_output_dir, render_card
    from hf_ext.mla import save_deepseek_v3
    from hf_ext.zoo import HUB_IDS

    check_output_dir(args.out, args.overwrite)
    with tempfile.TemporaryDirectory() as d:                 # verify before anything lands at --out
        save_deepseek_v3(mla, Path(d) / "m", tokenizer=tok)
        exported = AutoModelForCausalLM.from_pretrained(Path(d) / "m").eval()
        result.update(architecture=type(exported).__name__,
                      ppl_exported=perplexity(exported, tok, eval_text, **ev)["ppl"])
        del exported
        if args.llamacpp == "auto":
            result.update(llamacpp_figures(args, Path(d) / "m", eval_text))
    card = render_card("export_deepseek_v3", base_model=HUB_IDS.get(args.model, str(args.model)),
                       base_model_relation="finetune", metrics=result, tags=["mla", "deepseek_v3", "kv-cache-compression"],
                       model_name=f"{args.model} as DeepSeek-V3 MLA (KV cache {result['kv_ratio']:.1f}x smaller)")
    return save_deepseek_v3(mla, args.out, tokenizer=tok, card=card, overwrite=args.overwrite, report=result)


def llamacpp_figures(args, out, eval_text) -> dict:
    """llama.cpp's own figures for the source and the export, or how to get a build (never a failure)."""
    from hf_ext.errors import HfExtError
    from hf_ext.llamacpp import BUILD_COMMAND, is_built, measure_in_llamacpp
    from hf_ext.zoo import resolve_model

    if not is_built():
        print(f"llama.cpp: no build, so no llama.cpp figures; get one with `{BUILD_COMMAND}` (about 6 minutes)",
              file=sys.stderr)
        return {"llamacpp": f"not built; run `{BUILD_COMMAND}`"}
    chunks = max(2, (args.max_tokens or 4096) // 512)               # about as many tokens as our own figure
    try:
        return measure_in_llamacpp(resolve_model(args.model), out, eval_text, n_ctx=512, n_chunks=chunks)
    except HfExtError as e:                                         # the export is saved and verified already
        print(f"llama.cpp: could not measure ({str(e).splitlines()[0]})", file=sys.stderr)
        return {"llamacpp": f"failed: {str(e).splitlines()[0]}"}
