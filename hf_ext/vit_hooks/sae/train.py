"""``SAETrainConfig`` and ``train_sae``: train an SAE on an hf-ext activation store, through
``accelerate``; plus ``resample_dead_latents``, which the loop uses.

Recipe (papers in ``modeling_sae``): inputs scaled so E||x|| = sqrt(d_in) and the scale folded
into the weights at the end (April update); b_dec = geometric median of a sample (Bricken et al.); Adam with
a linear lr warmup and a linear decay over the last 20% (April update); the sparsity coefficient warmed up
linearly; gradient clipping; decoder rows kept at unit norm (gradient projection + renormalisation, Gao et al.);
dead latents resampled toward badly reconstructed inputs with their Adam state reset (Bricken et al.).

Held-out rows (``evaluate.split_indices``): record ``i`` of the store is an eval row when
``i % eval_every == 0``; it is never trained on.

Example:
    >>> from hf_ext.vit_hooks.sae import SAEConfig
    >>> from hf_ext.vit_hooks.sae.train import SAETrainConfig, train_sae
    >>> sae, log = train_sae("acts/", SAEConfig(d_in=768, d_sae=16384, architecture="topk", k=32),
    ...                      SAETrainConfig(total_rows=50_000_000))  # doctest: +SKIP
    >>> log["eval"]["explained_variance"], log["eval"]["l0"]  # doctest: +SKIP
    >>> sae.save_pretrained("sae-topk")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ...data import DataFormatError, Loader, ShardedDataset
from .configuration_sae import SAEConfig, SAEError
from .evaluate import evaluate_sae, open_activations, read_rows, split_indices
from .modeling_sae import SparseAutoencoder


@dataclass
class SAETrainConfig:
    """How to train an SAE.

    Args:
        batch_size: rows per optimiser step and process (Gao et al., Bricken et al.: 4096).
        total_rows: training rows to consume over all processes (epochs repeat as needed); None: one pass.
        lr: peak Adam learning rate.
        adam_betas: Adam's (beta1, beta2).
        warmup_fraction: share of steps with a linear lr warmup from 0.
        decay_fraction: share of final steps with a linear lr decay to 0 (April update: 0.2).
        sparsity_warmup_fraction: share of steps over which the L1 (standard) / L0 (jumprelu) coefficient
            rises linearly from 0 (April update: 0.05).
        max_grad_norm: gradient-norm clip (0: off).
        normalize_activations: train on x * s with E||s x|| = sqrt(d_in) (so coefficients transfer between
            models) and fold s into the saved weights, which then take raw activations.
        resample_every: steps between resamplings of dead latents (every architecture; 0: off).
        dead_window: a latent that has not fired for this many steps is dead (resampling; AuxK for top-k).
        init_rows: train rows sampled for b_dec's geometric median, the input scale and the resampling pool.
        eval_every: record i is held out for evaluation when i % eval_every == 0 (20: 5%); 0: no held-out rows.
        eval_max_rows: evaluate on at most this many held-out rows (None: all).
        field: the store field holding the activations.
        seed: seeds the init, the traversal order and the resampling.
        log_every: steps between entries of ``log["history"]``.
    """

    batch_size: int = 4096
    total_rows: int | None = None
    lr: float = 4e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.01
    decay_fraction: float = 0.2
    sparsity_warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    normalize_activations: bool = True
    resample_every: int = 25_000
    dead_window: int = 1_000
    init_rows: int = 4096
    eval_every: int = 20
    eval_max_rows: int | None = None
    field: str = "activations"
    seed: int = 0
    log_every: int = 100

    def __post_init__(self):
        if self.batch_size < 1 or self.lr <= 0 or self.init_rows < 1 or self.dead_window < 1:
            raise SAEError(f"batch_size={self.batch_size}, lr={self.lr}, init_rows={self.init_rows}, dead_window="
                           f"{self.dead_window}; all must be positive")
        for name in ("warmup_fraction", "decay_fraction", "sparsity_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise SAEError(f"{name}={getattr(self, name)}; give a share of the steps between 0 and 1")
        if self.eval_every == 1 or self.eval_every < 0:
            raise SAEError(f"eval_every={self.eval_every} would hold out every record; use 0 (none) or >= 2")
        if self.resample_every < 0 or self.max_grad_norm < 0:
            raise SAEError("resample_every and max_grad_norm must be >= 0 (0 switches them off)")


class _Rows:
    """A view of some records of a ShardedDataset, for ``Loader`` (``__len__`` + ``__getitems__``)."""

    def __init__(self, ds: ShardedDataset, indices: np.ndarray):
        self.ds, self.indices = ds, np.asarray(indices, np.int64)  # sorted, so sorted batches stay sorted

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, idx) -> dict:
        return self.ds.__getitems__(self.indices[np.asarray(idx, np.int64)])



@torch.no_grad()
def resample_dead_latents(sae: SparseAutoencoder, dead: torch.Tensor, pool: torch.Tensor, optimizer=None,
                          generator: torch.Generator | None = None) -> int:
    """Bricken et al.'s resampling: each dead latent gets the direction of a pool row drawn with probability
    proportional to its squared reconstruction loss; its decoder row is that unit direction, its encoder
    column the same scaled to 0.2 x the mean live encoder norm, b_enc = 0 (jumprelu: the initial threshold),
    and its Adam moments are zeroed. Returns how many latents were resampled."""
    idx = dead.nonzero().squeeze(1)                                       # (n_dead,)
    if idx.numel() == 0:
        return 0
    pool = pool.to(sae.W_enc.device, sae.W_enc.dtype)                     # (P, d_in)
    loss = torch.cat([(sae(c) - c).pow(2).sum(-1) for c in pool.split(4096)]).double().cpu()  # (P,)
    p = loss.pow(2) if float(loss.pow(2).sum()) > 0 else torch.ones_like(loss)
    pick = torch.multinomial(p, idx.numel(), replacement=True, generator=generator)
    v = pool[pick.to(pool.device)] - (sae.b_dec if sae.config.apply_b_dec_to_input else 0)  # (n_dead, d_in)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
    live = ~dead
    enc_norm = sae.W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
    sae.W_dec[idx] = v
    sae.W_enc[:, idx] = v.T * 0.2 * enc_norm
    sae.b_enc[idx] = 0
    if sae.config.architecture == "jumprelu":
        sae.threshold[idx] = sae.config.jumprelu_init_threshold
    if optimizer is not None:
        rows = {"W_dec": (idx,), "W_enc": (slice(None), idx), "b_enc": (idx,), "threshold": (idx,)}
        for name, param in sae.named_parameters():
            for moment in ("exp_avg", "exp_avg_sq"):
                if name in rows and moment in optimizer.state.get(param, {}):
                    optimizer.state[param][moment][rows[name]] = 0
    return int(idx.numel())


def _lr_factor(step: int, steps: int, tc: SAETrainConfig) -> float:
    warm = max(1, math.ceil(tc.warmup_fraction * steps))
    decay_start = steps - int(tc.decay_fraction * steps)
    factor = min(1.0, (step + 1) / warm)
    return factor * min(1.0, (steps - step) / (steps - decay_start)) if step >= decay_start else factor



def _with_provenance(sae_config: SAEConfig, prov: dict) -> SAEConfig:
    """``sae_config`` with an empty ``hook_name``/``model_name`` (and ``cls_only``) taken from the store header."""
    return dataclasses.replace(sae_config, hook_name=sae_config.hook_name or prov.get("hook_name", ""),
                               model_name=sae_config.model_name or prov.get("model", ""),
                               metadata={**({"cls_only": prov["cls_only"]} if "cls_only" in prov else {}),
                                         **sae_config.metadata})


def _initial_sae(sae: SparseAutoencoder | None, sae_config: SAEConfig, sample: torch.Tensor, scale: float,
                 seed: int) -> SparseAutoencoder:
    """The float32 SAE training starts from, taking ``scale * x``: a fresh one (seeded) or ``sae`` continued;
    b_dec at the geometric median of the scaled ``sample`` (N, d_in) unless ``sae`` already has one."""
    torch.manual_seed(seed)
    if sae is None:
        sae = SparseAutoencoder(dataclasses.replace(sae_config, dtype="float32"))
        sae.init_b_dec_geometric_median(sample * scale)
    else:
        sae = sae.float()
        sae.fold_activation_scale(1 / scale)
        if not sae.b_dec.any():  # a fresh SAE: uncentred inputs make new and resampled latents die at once
            sae.init_b_dec_geometric_median(sample * scale)
    sae.config = dataclasses.replace(sae.config, hook_name=sae_config.hook_name, model_name=sae_config.model_name,
                                     metadata=sae_config.metadata)
    return sae


def _optimizer_step(acc, model, sae: SparseAutoencoder, opt, x: torch.Tensor, dead_mask: torch.Tensor,
                    sparsity_scale: float, max_grad_norm: float) -> dict:
    """One Adam step on the scaled batch ``x`` (B, d_in) with decoder rows kept at unit norm (Gao et al.);
    returns the forward's dict (``forward_with_loss``). ``model`` is ``sae`` as ``acc.prepare`` wrapped it."""
    out = model(x, with_loss=True, dead_mask=dead_mask, sparsity_scale=sparsity_scale)
    acc.backward(out["loss"])
    with torch.no_grad():  # drop the part of each decoder gradient that would change its norm
        W, G = sae.W_dec, sae.W_dec.grad                                      # (d_sae, d_in)
        G -= (G * W).sum(1, keepdim=True) * W / W.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
    if max_grad_norm:
        acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    return out


def _finished_sae(sae: SparseAutoencoder, scale: float, dtype: str) -> SparseAutoencoder:
    """The trained SAE made to take raw activations (scale folded in), in ``dtype``, in eval mode."""
    sae.fold_activation_scale(scale)
    sae.to(getattr(torch, dtype))
    sae.config = dataclasses.replace(sae.config, dtype=dtype)
    return sae.eval()


def train_sae(store, sae_config: SAEConfig | None, train_config: SAETrainConfig | None = None, accelerator=None,
              progress: bool = True, sae: SparseAutoencoder | None = None):
    """Train an SAE on a store's ``field`` rows; returns ``(sae, log)``.

    Args:
        store: a store folder or ``ShardedDataset`` of rows (d_in,) (float32/float16/bfloat16).
        sae_config: the SAE; empty ``hook_name``/``model_name`` are taken from the store's provenance.
        train_config: ``SAETrainConfig`` (defaults if None).
        accelerator: an ``accelerate.Accelerator`` (a new one if None): one CPU, one GPU or DDP.
        progress: a tqdm bar on stderr (main process).
        sae: continue training this SAE (in place; it takes raw activations) instead of a fresh one; then
            ``sae_config`` is None (or equal to ``sae.config``). A b_dec of zeros gets the geometric median.

    The log holds ``steps``, ``rows``, ``seconds``, ``train_rows``, ``eval_rows``, ``activation_scale``,
    ``resampled``, ``history`` and the ``train`` / ``eval`` metrics of ``evaluate_sae`` (train: on the
    ``init_rows`` sample).

    Longer than 80 lines on purpose: the setup and the optimiser step are helpers, but the training loop
    stays whole so the order of each step (lr, update, dead-latent count, resampling, log) reads top to bottom.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    tc = train_config or SAETrainConfig()
    if sae is not None and sae_config not in (None, sae.config):
        raise SAEError("train_sae got both an SAE to continue and a different sae_config; pass sae_config=None "
                       "to continue the SAE, or sae=None to train a new one")
    sae_config = sae.config if sae is not None else sae_config
    if sae_config is None:
        raise SAEError("train_sae needs an SAEConfig (or an SAE to continue, sae=...)")
    ds = open_activations(store, sae_config.d_in, tc.field)
    sae_config = _with_provenance(sae_config, ds.provenance)
    acc = accelerator or Accelerator()
    world, start = acc.num_processes, time.perf_counter()
    train_idx, eval_idx = split_indices(len(ds), tc.eval_every)
    if len(train_idx) < tc.batch_size * world:
        raise DataFormatError(f"store {ds.root} has {len(train_idx)} training rows, fewer than one batch of "
                              f"{tc.batch_size} x {world} processes; lower batch_size or write more rows")
    steps = max(1, (tc.total_rows or len(train_idx)) // (tc.batch_size * world))

    # the same sample, init and seed on every rank, so the replicas start equal
    rng = np.random.default_rng(tc.seed)
    sample_idx = np.sort(rng.choice(train_idx, min(tc.init_rows, len(train_idx)), replace=False))
    sample = next(read_rows(ds, sample_idx, tc.field, chunk=len(sample_idx)))  # (S, d_in) float32, raw
    scale = float(math.sqrt(sae_config.d_in) / sample.norm(dim=1).mean().clamp_min(1e-12)) \
        if tc.normalize_activations else 1.0
    sae = _initial_sae(sae, sae_config, sample, scale, tc.seed).to(acc.device)
    pool = (sample * scale).to(acc.device)
    opt = torch.optim.Adam(sae.parameters(), lr=tc.lr, betas=tc.adam_betas)
    model, opt = acc.prepare(sae, opt)
    loader = Loader(_Rows(ds, train_idx), tc.batch_size, order="random", seed=tc.seed, drop_last=True,
                    device=acc.device, rank=acc.process_index, world_size=world)
    since_fired = torch.zeros(sae_config.d_sae, dtype=torch.long, device=acc.device)
    gen = torch.Generator().manual_seed(tc.seed)
    history, resampled, step = [], 0, 0
    bar = tqdm(total=steps, desc=f"SAE {sae_config.architecture}", file=sys.stderr,
               disable=not (progress and acc.is_main_process))
    while step < steps:
        for batch in loader:
            for g in opt.param_groups:
                g["lr"] = tc.lr * _lr_factor(step, steps, tc)
            warm = min(1.0, (step + 1) / max(1.0, tc.sparsity_warmup_fraction * steps))
            x = batch[tc.field].float() * scale                                  # (B, d_in)
            out = _optimizer_step(acc, model, sae, opt, x, since_fired >= tc.dead_window, warm, tc.max_grad_norm)
            fired = acc.reduce((out["feature_acts"].detach() != 0).any(0).float(), "sum") > 0  # (d_sae,)
            since_fired = torch.where(fired, 0, since_fired + 1)
            step += 1
            if tc.resample_every and step % tc.resample_every == 0 and step < steps:
                dead = since_fired >= tc.dead_window
                n = resample_dead_latents(sae, dead, pool, opt, gen)
                since_fired[dead] = 0
                resampled += n
            if step % tc.log_every == 0 or step == steps:  # .item() syncs the GPU: not every step
                l0 = float((out["feature_acts"] != 0).float().sum(-1).mean())
                history.append({"step": step, "loss": out["loss"].item(), "mse": out["mse"].item(), "l0": l0})
                bar.set_postfix(loss=f"{history[-1]['loss']:.4g}", l0=f"{l0:.1f}", refresh=False)
            bar.update(1)
            if step == steps:
                break
    bar.close()
    sae = _finished_sae(acc.unwrap_model(model), scale, sae_config.dtype)
    held = eval_idx if tc.eval_max_rows is None else eval_idx[:tc.eval_max_rows]
    log = {"architecture": sae_config.architecture, "steps": steps, "rows": steps * tc.batch_size * world,
           "train_rows": len(train_idx), "eval_rows": len(held), "activation_scale": scale,
           "resampled": resampled, "history": history, "train": evaluate_sae(sae, sample, batch_size=tc.batch_size),
           "eval": evaluate_sae(sae, ds, tc.field, held, tc.batch_size) if len(held) else None}
    log["seconds"] = time.perf_counter() - start
    return sae, log


__all__ = ["SAETrainConfig", "resample_dead_latents", "train_sae"]
