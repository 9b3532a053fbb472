"""`hf-ext sae train`: a sparse autoencoder (standard, top-k or JumpReLU) on an activation store."""
from __future__ import annotations

from .common import add_command, add_field, add_group, add_json_arg, emit


def add_parser(sub) -> None:
    sae = add_group(sub, "sae", "sparse autoencoders on an activation store", dest="sae_cmd")
    add_command(sae, "train", "train an SAE (standard, top-k or JumpReLU) on a store, save it (SAELens layout)",
                train_arguments, run_sae_train)


def train_arguments(p) -> None:
    from hf_ext.vit_hooks.sae import SAEConfig
    from hf_ext.vit_hooks.sae.train import SAETrainConfig

    p.add_argument("--store", required=True, help="activation store (`hf-ext hooks cache ... --out STORE`)")
    add_field(p, SAEConfig, "architecture", "--variant", choices=["standard", "topk", "jumprelu"],
              help="top-k here; SAEConfig's own default is SAELens's standard")
    p.set_defaults(architecture="topk")
    add_field(p, SAEConfig, "k", help="top-k: active latents per row")
    p.add_argument("--expansion", type=int, default=16, help="latents = expansion x width (default 16)")
    add_field(p, SAEConfig, "l1_coefficient", "--l1", help="standard: L1 coefficient (inputs are normalised)")
    add_field(p, SAEConfig, "l0_coefficient", "--l0", help="jumprelu: L0 coefficient")
    add_field(p, SAETrainConfig, "lr")
    add_field(p, SAETrainConfig, "batch_size")
    add_field(p, SAETrainConfig, "total_rows", type=int, help="training rows (default: one pass over the store)")
    p.add_argument("--eval-store", help="score on this store (default: the store's held-out rows, 1 in 20)")
    add_field(p, SAETrainConfig, "seed")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    add_json_arg(p)


def run_sae_train(args) -> None:
    from pathlib import Path

    from hf_ext.data import ShardedDataset
    from hf_ext.hub import check_output_dir, render_card, save_converted
    from hf_ext.vit_hooks.sae import SAEConfig
    from hf_ext.vit_hooks.sae.train import SAETrainConfig, evaluate_sae, train_sae

    out = check_output_dir(args.out, args.overwrite)
    ds = ShardedDataset(args.store)                  # a missing or incomplete store fails here
    width = ds.fields[0].shape[0] if ds.fields[0].shape else 0
    cfg = SAEConfig(d_in=width, d_sae=args.expansion * width, architecture=args.architecture, k=args.k,
                    l1_coefficient=args.l1_coefficient, l0_coefficient=args.l0_coefficient)
    tcfg = SAETrainConfig(batch_size=args.batch_size, total_rows=args.total_rows, lr=args.lr, seed=args.seed,
                          eval_every=0 if args.eval_store else 20)
    sae, log = train_sae(ds, cfg, tcfg)
    metrics = evaluate_sae(sae, args.eval_store) if args.eval_store else log["eval"]
    result = {"variant": args.architecture, "d_in": width, "d_sae": cfg.d_sae, "steps": log["steps"],
              "train_rows": log["train_rows"], **{f"eval_{k}": v for k, v in metrics.items()},
              "hook_name": sae.config.hook_name, "model": sae.config.model_name}
    card = render_card("sae", base_model=None, metrics=result, base_model_relation="adapter",
                       tags=["sae", args.architecture], model_name=f"{args.architecture} SAE on {result['hook_name']}", args=args)
    save_converted(sae, out, card=card, overwrite=args.overwrite,
                   report={**result, "log": {k: v for k, v in log.items() if k != "history"}})
    emit({**result, "out": str(Path(args.out))}, args.json)
