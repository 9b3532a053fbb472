"""`hf-ext convert icc`: compute ICC calibration factors for a diffusion transformer and save them beside it."""
from __future__ import annotations

from .common import add_command, add_field, add_json_arg, add_output_args, emit, load_diffusers_model, maybe_push


def add_parser(sub) -> None:
    add_command(sub, "icc", "increment-calibrated caching factors (SVD / CA-SVD / CD-SVD / RRR) for a diffusion "
                       "transformer", arguments, run)


def arguments(p) -> None:
    from hf_ext.dit_cache.config import ICCConfig as C

    p.add_argument("--model", required=True, help="a saved diffusers transformer folder (or a pipeline folder)")
    add_field(p, C, "rank", help="rank of each layer's correction")
    add_field(p, C, "method", choices=["ca-svd", "cd-svd", "svd", "rrr"],
              help="rrr: regression of the forecast's miss (with --granularity module)")
    add_field(p, C, "granularity", choices=["linear", "module"],
              help="cache linear layers (the paper) or whole attention / MLP modules")
    add_field(p, C, "forecast", help="Taylor order of the forecast (0: the paper's reuse)")
    add_field(p, C, "full_every", help="recompute everything every N denoiser calls")
    add_field(p, C, "warmup", help="the first N denoiser calls are always full")
    p.add_argument("--calib-samples", type=int, default=4, help="samples in the calibration run (16 for rrr: "
                   "benchmarks/dit_cache_robustness.py)")
    p.add_argument("--ridge", default="auto", help="rrr's relative ridge, or 'auto': the best of a decade grid, "
                   "closed loop on a development run of --dev-samples samples (hf_ext.dit_cache.select_ridge)")
    p.add_argument("--dev-samples", type=int, default=32, help="samples in rrr's ridge-selection run")
    p.add_argument("--calib-steps", type=int, default=10, help="DDIM steps of the calibration and check runs")
    add_output_args(p)
    add_json_arg(p)


def run(args) -> None:
    import torch

    from functools import partial

    from hf_ext.dit_cache import (ICCConfig, ICCError, apply_icc_cache, calibrate, icc_state, remove_icc_cache,
                                  save_factors, select_ridge)
    from hf_ext.dit_cache.calibration import check_dit, ddim_trajectory
    from hf_ext.macs import count_macs
    from hf_ext.hub import check_output_dir, render_card, save_converted

    auto = args.ridge == "auto"
    try:
        ridge = 1e-3 if auto else float(args.ridge)
    except ValueError:
        raise ICCError(f"--ridge {args.ridge!r}: give a positive number (e.g. 1e-3) or 'auto'") from None
    config = ICCConfig(rank=args.rank, method=args.method, full_every=args.full_every, warmup=args.warmup,
                       forecast=args.forecast, granularity=args.granularity, ridge=ridge)
    out = check_output_dir(args.out, args.overwrite)
    model = load_diffusers_model(args.model)
    check_dit(model)
    calib = partial(ddim_trajectory, model, args.calib_samples, args.calib_steps, seed=0)
    if auto and args.method == "rrr":   # development run: seed 2; seed 1 stays held out for the check below
        config, factors, _ = select_ridge(model, config, calib, partial(ddim_trajectory, model, args.dev_samples,
                                                                        args.calib_steps, seed=2), progress=True)
    else:
        factors = calibrate(model, config, calib)
    # measured on a held-out trajectory (other seed): MACs of the whole run and final-sample error
    with torch.no_grad(), count_macs() as full:
        ref = ddim_trajectory(model, 2, args.calib_steps, seed=1)
    apply_icc_cache(model, config, factors)
    with torch.no_grad(), count_macs() as cached:
        got = ddim_trajectory(model, 2, args.calib_steps, seed=1)
    state = icc_state(model)
    remove_icc_cache(model)
    result = {"method": args.method, "rank": args.rank, "granularity": args.granularity, "forecast": args.forecast,
              "full_every": args.full_every, "warmup": args.warmup,
              "layers": len(factors), "macs_saved": 1 - cached.total / full.total,
              "final_rel_error": float((got - ref).norm() / ref.norm()), "full_steps": state.full_steps,
              "steps": state.step, **({"ridge": config.ridge} if args.method == "rrr" else {})}
    card = render_card("icc", base_model=None, metrics=result, base_model_relation="adapter", tags=["icc", "dit"],
                       model_name=f"{type(model).__name__} + ICC ({args.method}, rank {args.rank})", args=args)
    out = save_converted(model, out, card=card, overwrite=args.overwrite,
                         extra=lambda folder: save_factors(folder, factors, config))
    url = maybe_push(args, out)
    if url:
        result["pushed"] = url
    emit({**result, "out": str(out)}, args.json)
