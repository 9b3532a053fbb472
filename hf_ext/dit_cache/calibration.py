"""Calibration: the statistics each correction is computed from, and the factors.

- ``channel_stats``: mean |x| and |y| per channel (CA-SVD), or of step-to-step increments (CD-SVD);
- ``residual_stats``: Gram sums of what the forecast misses under the config's schedule (RRR);
- ``compute_factors`` / ``calibrate``: the (A, B) of every cached layer;
- ``select_ridge``: RRR's ridge chosen closed-loop, on a development run other than the calibration run;
- ``ddim_trajectory``: class-conditional DDIM sampling (DiT-style inputs: latents, timestep, class labels;
  classifier-free guidance batched) from seeded noise, the default calibration run.
"""
from __future__ import annotations

import torch

from .config import ICCConfig, ICCError
from .hooks import apply_icc_cache, call_timestep, remove_icc_cache, target_layers
from .ops import ca_svd_factors, rrr_factors, svd_factors, taylor_forecast


def check_dit(transformer) -> None:
    """Refuse (``ICCError``) a transformer the built-in DiT calibration run cannot sample."""
    if getattr(transformer.config, "num_embeds_ada_norm", None) is None:
        raise ICCError(f"{type(transformer).__name__} is not a class-conditional DiT; the built-in calibration run "
                       "samples DiT-style. Calibrate through the API with your own run=... (a few pipeline steps)")


@torch.no_grad()
def ddim_trajectory(transformer, samples: int = 4, steps: int = 10, guidance: float = 1.5, seed: int = 0,
                    on_step=None, scheduler=None) -> torch.Tensor:
    """DDIM sampling (or ``scheduler``'s) of ``samples`` random classes; returns the final latents."""
    from diffusers import DDIMScheduler

    check_dit(transformer)
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    classes = cfg.num_embeds_ada_norm
    labels = torch.randint(0, classes, (samples,), generator=g)
    x = torch.randn(samples, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    sched = (DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False) if scheduler is None
             else type(scheduler).from_config(scheduler.config))
    sched.set_timesteps(steps)
    null = torch.full_like(labels, classes)
    for i, t in enumerate(sched.timesteps):
        out = transformer(torch.cat([x, x]), timestep=t.expand(2 * samples), class_labels=torch.cat([labels, null])).sample
        cond, uncond = out[:, :cfg.in_channels].chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        if on_step is not None:
            on_step(i, t)
    return x


def _run_hooked(run, handles: list) -> None:
    """``run()`` with the forward hooks in ``handles`` attached, removed afterwards whatever happens."""
    try:
        run()
    finally:
        for h in handles:
            h.remove()


def compute_factors(transformer, config: ICCConfig, stats: dict | None = None, allow_full_rank: bool = False) -> dict:
    """``{layer name: (A, B)}`` for every cached layer. ``stats`` is needed for CA-SVD and CD-SVD (from
    ``channel_stats``; they share the weighted factorisation and differ only in what was measured) and for RRR
    (from ``residual_stats``)."""
    if config.method == "reuse":
        return {}
    out = {}
    for name, lin in target_layers(transformer, config).items():
        if config.method == "rrr":
            if stats is None or name not in stats:
                raise ICCError("rrr needs residual statistics: run hf_ext.dit_cache.calibrate(..., run=...) first")
            xx, xy = stats[name]
            if config.rank >= min(xy.shape):
                raise ICCError(f"rank={config.rank} >= min(in, out)={min(xy.shape)} of {name}: the correction would "
                               "cost more than the layer; choose a smaller rank")
            out[name] = rrr_factors(xx, xy, config.rank, config.ridge)
            continue
        full = min(lin.in_features, lin.out_features)
        if config.rank > full or (config.rank == full and not allow_full_rank):
            raise ICCError(f"rank={config.rank} >= min(in, out)={full} of {name}: the correction would cost more "
                           "than the layer; choose a smaller rank")
        if config.method == "svd":
            out[name] = svd_factors(lin.weight, config.rank)
        else:
            if stats is None or name not in stats:
                raise ICCError(f"{config.method} needs calibration statistics: run hf_ext.dit_cache.calibrate(...) "
                               "first, or use method='svd'")
            out[name] = ca_svd_factors(lin.weight, *stats[name], config.rank, config.clamp)
    return out


@torch.no_grad()
def channel_stats(transformer, config: ICCConfig, run, increments: bool = False) -> dict:
    """Mean |x_j| and mean |y_i| of every targeted linear over ``run()`` (a few denoising calls).

    With ``increments=True`` (CD-SVD) the means are of the step-to-step increments |x_t - x_{t-1}| and
    |y_t - y_{t-1}| between consecutive calls of each layer, the quantities a cached step approximates.
    """
    sums, last, handles = {}, {}, []
    for name, lin in target_layers(transformer, config).items():
        def hook(mod, args, y, name=name):
            x, prev = args[0], last.get(name)
            if increments:
                last[name] = (x.detach().clone(), y.detach().clone())
                if prev is None or prev[0].shape != x.shape:
                    return
                x, y = x - prev[0], y - prev[1]
            sx, sy, n = sums.get(name, (0, 0, 0))
            sums[name] = (sx + x.abs().flatten(0, -2).sum(0).float(), sy + y.abs().flatten(0, -2).sum(0).float(),
                          n + x[..., 0].numel())
        handles.append(lin.register_forward_hook(hook))
    _run_hooked(run, handles)
    if len(sums) < len(handles):
        raise ICCError("the calibration run did not reach every targeted layer" +
                       (" at least twice (CD-SVD needs consecutive steps)" if increments else "") +
                       "; make run() call the transformer for a few denoising steps")
    return {name: (sx / n, sy / n) for name, (sx, sy, n) in sums.items()}


@torch.no_grad()
def residual_stats(transformer, config: ICCConfig, run) -> dict:
    """Gram sums ``(Σ dx dxᵀ, Σ dx dyᵀ)`` of every cached layer over ``run()`` (one uncached sampling run).

    The run is exact; along it, ``config``'s schedule is simulated: at each step it would cache, a layer's
    input and output misses dx = x - x_f and dy = y - y_f against their forecasts from the steps it would
    have recomputed (``taylor_forecast``, order ``config.forecast``) are accumulated, rows over tokens and
    batch. One transformer call is one step (CFG branches batched in one call, as DiT pipelines do); a
    rising timestep starts a new run, so ``run()`` may sample several times.
    """
    step, last_t, sums, hist, handles = [-1], [None], {}, {}, []

    def count(module, args, kwargs):
        t = call_timestep(module, args, kwargs)
        if t is not None and last_t[0] is not None and t > last_t[0]:
            step[0] = -1                                  # a new sampling run: timesteps only fall within one
            hist.clear()
        last_t[0] = t
        step[0] += 1
    handles.append(transformer.register_forward_pre_hook(count, with_kwargs=True))
    for name, layer in target_layers(transformer, config).items():
        def hook(mod, args, y, name=name):
            x, y = args[0], (y[0] if isinstance(y, tuple) else y)
            h = hist.get(name, [])
            if h and h[-1][1][0].shape != x.shape:
                h = []                                                 # batch or resolution changed
            if config.is_full(step[0]) or not h:
                hist[name] = (h + [(step[0], (x.detach().clone(), y.detach().clone()))])[-(config.forecast + 1):]
                return
            dx = (x - taylor_forecast([(s, v[0]) for s, v in h], step[0], config.forecast)).flatten(0, -2).double()
            dy = (y - taylor_forecast([(s, v[1]) for s, v in h], step[0], config.forecast)).flatten(0, -2).double()
            xx, xy = sums.get(name, (0, 0))
            sums[name] = (xx + dx.T @ dx, xy + dx.T @ dy)                # (in, in), (in, out)
        handles.append(layer.register_forward_hook(hook))
    _run_hooked(run, handles)
    if len(sums) < len(handles) - 1:
        raise ICCError("the calibration run reached no step its schedule would cache for some layers; make run() "
                       f"call the transformer for more steps than warmup={config.warmup} + full_every="
                       f"{config.full_every}")
    return sums


def calibrate(transformer, config: ICCConfig, run=None) -> dict:
    """Factors for ``config``: SVD needs only the weights; CA-SVD and CD-SVD also run ``run()`` once to
    measure the channels (of the activations, or of their step-to-step increments); RRR runs it once to
    measure what the forecast misses under the config's schedule."""
    if config.method in ("ca-svd", "cd-svd", "rrr") and run is None:
        raise ICCError(f"{config.method} calibration needs run=..., a callable that runs a few denoising steps")
    stats = None
    if config.method in ("ca-svd", "cd-svd"):
        stats = channel_stats(transformer, config, run, increments=config.method == "cd-svd")
    elif config.method == "rrr":
        stats = residual_stats(transformer, config, run)
    return compute_factors(transformer, config, stats)


RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)   # a decade grid; rrr_factors' ridge is relative to the mean input energy


@torch.no_grad()
def select_ridge(transformer, config: ICCConfig, run, dev_run, ridges=RIDGES, progress: bool = False):
    """RRR's ridge, chosen where it matters: closed loop, on ``dev_run()``, a sampling run other than ``run()``.

    The fit sees what the forecast misses along the exact trajectory (open loop); applied, each correction
    also sees the errors of the cached modules upstream, which a weakly regularised fit amplifies. So the
    residual statistics are measured once on ``run()``, and for each ridge in ``ridges`` the cached
    transformer samples ``dev_run()`` (which must return the final sample, e.g. ``ddim_trajectory``); the
    ridge whose sample is closest (mean squared error) to the uncached one wins. Costs ``len(ridges) + 2``
    sampling runs. Returns ``(config with the chosen ridge, its factors, {ridge: dev MSE})``.

    Example:
        >>> from functools import partial
        >>> cfg = ICCConfig(rank=8, method="rrr", granularity="module", forecast=1, full_every=2, warmup=2)
        >>> cfg, factors, scores = select_ridge(dit, cfg, partial(ddim_trajectory, dit, 4, 20, seed=0),
        ...                                     partial(ddim_trajectory, dit, 4, 20, seed=1))  # doctest: +SKIP
        >>> apply_icc_cache(dit, cfg, factors)  # doctest: +SKIP
    """
    from dataclasses import replace

    from tqdm.auto import tqdm

    if config.method != "rrr":
        raise ICCError(f"select_ridge is for method='rrr', not {config.method!r}")
    if not ridges or min(ridges) <= 0:
        raise ICCError(f"ridges={ridges!r}; give one or more positive relative ridges, e.g. {RIDGES}")
    stats = residual_stats(transformer, config, run)
    ref = dev_run()
    if not isinstance(ref, torch.Tensor):
        raise ICCError("dev_run() must return the final sample as a tensor (as ddim_trajectory does)")
    scores, best = {}, None
    for ridge in tqdm(ridges, desc="ICC ridge", disable=not progress):
        cfg = replace(config, ridge=float(ridge))
        factors = compute_factors(transformer, cfg, stats)
        apply_icc_cache(transformer, cfg, factors)
        try:
            scores[cfg.ridge] = float(((dev_run() - ref) ** 2).mean())
        finally:
            remove_icc_cache(transformer)
        if best is None or scores[cfg.ridge] < scores[best[0].ridge]:
            best = (cfg, factors)
    return best[0], best[1], scores
