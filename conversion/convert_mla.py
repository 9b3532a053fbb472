"""`hf-ext convert mla`: upcycle a Llama-family checkpoint to MLA, optionally distil, verify, save, push."""
from __future__ import annotations

import sys

from .common import add_eval_args, add_json_arg, add_output_args, emit, load_source, maybe_push


def add_parser(sub) -> None:
    p = sub.add_parser("mla", help="upcycle attention to Multi-head Latent Attention (latent KV cache)")
    p.add_argument("--model", default="smollm2-135m", help="zoo name, local folder or Hub repo id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--kv-ratio", type=float, help="target KV compression vs the source (default 6.4; with "
                   "--format deepseek_v3, the widest llama.cpp-friendly latent at >= 6x, 32 + 32 on SmolLM2)")
    g.add_argument("--kv-lora-rank", type=int, help="latent width r")
    g.add_argument("--energy", type=float, help="smallest rank keeping this energy fraction")
    g.add_argument("--lossless", action="store_true", help="full rank, every RoPE dim: reproduces the source")
    p.add_argument("--rope-dim", type=int, help="qk_rope_head_dim, even (default 24; 32 with --format deepseek_v3)")
    p.add_argument("--rope-sharing", choices=["shared", "per_kv_head"], default="shared")
    p.add_argument("--rope-rotation", choices=["auto", "rorope", "none"], default="auto",
                   help="auto: rorope for shared keys on sources without per-head q/k norms, else none")
    p.add_argument("--rope-selection", choices=["qk_freq", "2norm", "high_freq", "geometric"], default="qk_freq",
                   help="with --format deepseek_v3, qk_freq becomes geometric (every c-th frequency)")
    p.add_argument("--format", choices=["hf_ext", "deepseek_v3"], default="hf_ext",
                   help="hf_ext: our MLAForCausalLM (remote code); deepseek_v3: a stock DeepseekV3ForCausalLM "
                        "checkpoint (no Python files) for transformers, llama.cpp, vLLM and SGLang")
    p.add_argument("--latent-norm-init", choices=["identity", "gain"], default="identity",
                   help="deepseek_v3: DeepSeek's latent norms as identities, folded in at export after training "
                        "without them (identity, default: 1.31x better after distillation), or an active KV norm "
                        "trained in the model (gain)")
    p.add_argument("--llamacpp", choices=["auto", "off"], default="auto",
                   help="deepseek_v3: also measure the source and the export in llama.cpp (f16 perplexity, KV "
                        "cache at 16k) when a build is present (auto, default), else say how to build one")
    p.add_argument("--kv-init", choices=["qo_whitened", "whitened", "svd"], default="qo_whitened")
    p.add_argument("--nope-rotation", choices=["mean", "none"], default="mean")
    p.add_argument("--key-weight", type=float, default=4.0, help="key vs value error weight (default 4)")
    p.add_argument("--calib-text", default="python-docs:train", help="calibration text (default python-docs:train)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--distill-tokens", type=int, default=0, help="distillation tokens after upcycling (default 0)")
    p.add_argument("--train-text", default="python-docs:train", help="distillation text (default python-docs:train)")
    p.add_argument("--train-store", help="distil on an hf-ext token store instead of --train-text "
                   "(`hf-ext data tokens --window SEQ_LEN`): memory-mapped, read by the fast loader")
    p.add_argument("--lr", type=float, default=5e-4, help="distillation peak learning rate (default 5e-4, chosen on "
                   "a train-split validation)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--checkpoint-dir", help="save/resume distillation state here")
    p.add_argument("--norm-anneal", type=float, default=None,
                   help="deepseek_v3: the fraction of distillation steps over which the KV latent norm goes from "
                        "the identity to DeepSeek's (default 0.5 with latent norms; 0 trains it as it starts)")
    add_output_args(p)
    add_eval_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> None:
    import torch

    from hf_ext.eval import perplexity, tokenize
    from hf_ext.hub import render_card, save_converted
    from hf_ext.mla import UpcycleConfig, upcycle_to_mla
    from hf_ext.mla.distill import DistillConfig, distill
    from hf_ext.mla.measure import kv_bytes_per_token
    from hf_ext.mla.export import engine_latent_dims
    from hf_ext.zoo import HUB_IDS, load_corpus

    store = None
    if args.train_store and args.distill_tokens > 0:
        from hf_ext.data import ShardedDataset

        store = ShardedDataset(args.train_store)  # a missing or incomplete store fails before the model loads
    eval_text, model, tok = load_source(args)
    if args.lossless:
        ucfg = UpcycleConfig.lossless(model.config)
    else:
        kv_lora_rank, rope_dim = args.kv_lora_rank, args.rope_dim or 24
        if args.format == "deepseek_v3" and not (args.kv_ratio or args.kv_lora_rank or args.energy):
            kv_lora_rank, rope_dim = engine_latent_dims(model.config, rope_dim=args.rope_dim or 32)
        ucfg = UpcycleConfig(kv_ratio=args.kv_ratio if not (kv_lora_rank or args.energy) else None,
                             kv_lora_rank=kv_lora_rank, energy=args.energy, qk_rope_head_dim=rope_dim,
                             rope_key_sharing=args.rope_sharing, rope_selection=args.rope_selection,
                             rope_rotation=args.rope_rotation,
                             kv_init=args.kv_init, nope_rotation=args.nope_rotation, key_weight=args.key_weight,
                             target=args.format, latent_norm_init=args.latent_norm_init)
        if ucfg.kv_ratio is None and ucfg.kv_lora_rank is None and ucfg.energy is None:
            ucfg.kv_ratio = 6.4
    calib = tokenize(tok, load_corpus(args.calib_text), args.calib_tokens) if ucfg.needs_calibration() else None
    mla, report = upcycle_to_mla(model, ucfg, calib_ids=calib)
    ev = dict(max_tokens=args.max_tokens, window=args.window)
    ppl_src = perplexity(model, tok, eval_text, **ev)["ppl"]
    ppl_up = perplexity(mla, tok, eval_text, **ev)["ppl"]
    result = {"model": args.model, **{k: report[k] for k in ("kv_values_per_token_source", "kv_values_per_token", "kv_ratio")},
              "ppl_source": ppl_src, "ppl_upcycled": ppl_up, "ppl_converted": ppl_up, "distill_tokens": 0}
    if args.distill_tokens > 0:
        train_ids = store or tokenize(tok, load_corpus(args.train_text), args.distill_tokens + args.calib_tokens)
        log = distill(mla, model, train_ids, DistillConfig(tokens=args.distill_tokens, seq_len=args.seq_len,
                      batch_size=args.batch_size, lr=args.lr, checkpoint_dir=args.checkpoint_dir,
                                                   norm_anneal=args.norm_anneal))
        result.update(ppl_converted=perplexity(mla, tok, eval_text, **ev)["ppl"], distill_tokens=log["tokens"],
                      distill_seconds=log["seconds"], distill_tokens_per_s=log["tokens_per_s"],
                      **({"norm_anneal": log["norm_anneal"]} if log["norm_anneal"] else {}))
    prompt = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    result["kv_bytes_per_token_source"] = kv_bytes_per_token(model, prompt)
    result["kv_bytes_per_token"] = kv_bytes_per_token(mla, prompt)
    result.update({k: report[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "rope_key_sharing", "rope_rotation",
                                          "rope_selection", "kv_init", "calib_tokens", "energy_kept_mean")})
    result.update({k: report[k] for k in ("rope_stride", "latent_norm_init") if k in report}, format=args.format)
    result.update(eval_text=args.eval_text, eval_tokens=args.max_tokens, window=args.window)
    if args.format == "deepseek_v3":
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
