"""`hf-ext convert tfmq`: timestep-aware quantization (TFMQ-DM) of a class-conditional DiT, saved beside it."""
from __future__ import annotations

from .common import add_command, add_field, add_json_arg, add_output_args, emit, load_diffusers_model, maybe_push

BITS = {"int8": 8, "int4": 4}


def add_parser(sub) -> None:
    add_command(sub, "tfmq", "temporal feature cache + timestep-aware PTQ (simulated W8A8 / W4A8) for a DiT", arguments, run)


def arguments(p) -> None:
    from hf_ext.temporal.quant import TFMQConfig as C

    p.add_argument("--model", required=True, help="a saved diffusers DiT folder (or a pipeline folder)")
    p.add_argument("--weights", choices=list(BITS), default="int8")
    p.add_argument("--activations", choices=["int8"], default="int8")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps the quantization is calibrated for")
    add_field(p, C, "calibration", choices=["finite-set", "minmax"])
    add_field(p, C, "temporal", choices=["cache", "auto", "quantize"],
              help="temporal features: from the full-precision table, per module by disturbance, or quantized")
    p.add_argument("--calib-samples", type=int, default=8, help="samples in the calibration run")
    add_output_args(p)
    add_json_arg(p)


def run(args) -> None:
    import torch
    from diffusers import DDIMScheduler

    from hf_ext.dit_cache.calibration import check_dit, ddim_trajectory
    from hf_ext.hub import check_output_dir, render_card, save_converted
    from hf_ext.temporal.io import save_tfmq
    from hf_ext.temporal.quant import TFMQConfig, quantize_tfmq

    out = check_output_dir(args.out, args.overwrite)
    config = TFMQConfig(weight_bits=BITS[args.weights], act_bits=8, calibration=args.calibration,
                        temporal=args.temporal)
    model = load_diffusers_model(args.model)
    check_dit(model)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    traj = lambda n, seed: ddim_trajectory(model, n, args.steps, seed=seed, scheduler=sched)  # noqa: E731
    with torch.no_grad():
        ref = traj(4, 1)                                   # held out: another seed than the calibration
    state = quantize_tfmq(model, config, sched, args.steps, run=lambda: traj(args.calib_samples, 0))
    with torch.no_grad():
        got = traj(4, 1)
    result = {"weights": args.weights, "activations": args.activations, "steps": args.steps,
              "calibration": args.calibration, "temporal": args.temporal, "quantized_layers": len(state["ranges"]),
              "cached_temporal_modules": len(state["cached"]),
              "final_rel_error": float((got - ref).norm() / ref.norm()),
              "simulated": True}
    card = render_card("tfmq", base_model=None, metrics=result, base_model_relation="quantized", tags=["tfmq", "dit"],
                       model_name=f"{type(model).__name__} + TFMQ (W{config.weight_bits}A8, {args.steps} steps)",
                       args=args)
    out = save_converted(model, out, card=card, overwrite=args.overwrite, extra=lambda folder: save_tfmq(folder, model))
    url = maybe_push(args, out)
    if url:
        result["pushed"] = url
    emit({**result, "out": str(out)}, args.json)
