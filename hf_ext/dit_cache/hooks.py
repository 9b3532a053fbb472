"""ICC as diffusers hooks: a step hook on the transformer and one hook per cached linear layer.

Paper: https://arxiv.org/abs/2505.05829 (see ``ops.py`` for the math). Built like diffusers' own caches
(``diffusers/hooks/first_block_cache.py``): ``ModelHook``s in the transformer's ``HookRegistry``, with
per-context state in a ``StateManager``, so ``transformer.cache_context("cond")`` / ``("uncond")`` keep
separate caches for classifier-free guidance branches. Models that are not ``CacheMixin`` (DiT, PixArt,
SD3) run in one default context.

Per transformer call the step hook decides: full (every linear runs and stores its output ŷ and the
projection ẑ = B x̂ of its input) or cached (every targeted linear returns ŷ + A (B x - ẑ) = ŷ + A B (x - x̂)); norms, nonlinearities, attention and adaLN
modulation always run exactly. ``state.macs`` counts the multiply-accumulates the targeted layers actually
executed.

Example:
    >>> from hf_ext.dit_cache import ICCConfig, apply_icc_cache, calibrate
    >>> factors = calibrate(pipe.transformer, ICCConfig(rank=64), lambda: pipe(class_labels=[1], num_inference_steps=4))  # doctest: +SKIP
    >>> apply_icc_cache(pipe.transformer, ICCConfig(rank=64), factors)  # doctest: +SKIP
"""
from __future__ import annotations

import re

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager

from .config import ICCConfig, ICCError
from .ops import ca_svd_factors, icc_step_projected, svd_factors

STEP_HOOK = "hf_ext_icc_step"
LINEAR_HOOK = "hf_ext_icc_linear"


class ICCState(BaseState):
    """Per cache context: the step counter, this step's mode, and each layer's last full step (ẑ = x̂ Bᵀ, ŷ)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.step, self.full, self.cache, self.macs, self.full_steps = 0, True, {}, 0, 0


def target_linears(transformer: torch.nn.Module, config: ICCConfig) -> dict[str, torch.nn.Linear]:
    pattern = re.compile(config.targets)
    found = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n)}
    if not found:
        raise ICCError(f"{type(transformer).__name__} has no linear layer matching the ICC targets (attention "
                       "q/k/v/out and MLP layers inside transformer_blocks); pass targets=... naming its layers")
    return found


class _StepHook(ModelHook):
    _is_stateful = True

    def __init__(self, states: StateManager, config: ICCConfig):
        super().__init__()
        self.states, self.config = states, config

    def pre_forward(self, module, *args, **kwargs):
        if self.states._context is None:  # not a CacheMixin model, or called outside cache_context
            self.states.set_context(CacheContext("default"))
        st = self.states.get_state()
        st.full = st.step % self.config.full_every == 0 or not st.cache
        if self.config.threshold is not None and st.cache:
            st.full = False  # decided by the first targeted layer (see _LinearHook)
        st.step += 1
        st.full_steps += st.full
        return args, kwargs

    def reset_state(self, module):
        self.states.reset()
        return module


class _LinearHook(ModelHook):
    _is_stateful = True

    def __init__(self, name: str, states: StateManager, factors: tuple | None, threshold: float | None, first: bool):
        super().__init__()
        self.name, self.states, self.threshold, self.first = name, states, threshold, first
        self.A, self.B = factors if factors is not None else (None, None)

    def new_forward(self, module, x):
        # the cache holds, per layer, (x.shape, ẑ = x̂ Bᵀ or None, ŷ, x̂ if this layer decides adaptive steps)
        st = self.states.get_state()
        hit = st.cache.get(self.name)
        if hit is not None and hit[0] != x.shape:
            hit = None                                            # batch or resolution changed: recompute
        if hit is not None and self.first and self.threshold is not None and not st.full:
            rel = ((x - hit[3]).norm() / hit[3].norm().clamp_min(1e-12)).item()
            st.full = rel > self.threshold
            st.full_steps += st.full
        rows = x[..., 0].numel()
        if st.full or hit is None:
            y = self.fn_ref.original_forward(x)
            z = None
            if self.A is not None:
                self.A, self.B = self.A.to(x.device), self.B.to(x.device)
                z = x.reshape(-1, x.shape[-1]).to(self.B.dtype) @ self.B.T           # (N, r)
                st.macs += rows * module.in_features * self.A.shape[1]
            keep_x = x.detach() if self.first and self.threshold is not None else None
            st.cache[self.name] = (x.shape, z, y.detach(), keep_x)
            st.macs += rows * module.in_features * module.out_features
            return y
        if self.A is not None:
            st.macs += rows * (module.in_features + module.out_features) * self.A.shape[1]
            return icc_step_projected(x, hit[1], hit[2], self.A, self.B)
        return hit[2]

    def reset_state(self, module):
        self.states.reset()
        return module


def compute_factors(transformer, config: ICCConfig, stats: dict | None = None, allow_full_rank: bool = False) -> dict:
    """``{layer name: (A, B)}`` for every targeted linear. ``stats`` (from ``channel_stats``) is needed for
    CA-SVD and CD-SVD, which share the weighted factorisation and differ only in what was measured."""
    if config.method == "reuse":
        return {}
    out = {}
    for name, lin in target_linears(transformer, config).items():
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
    for name, lin in target_linears(transformer, config).items():
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
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if len(sums) < len(handles):
        raise ICCError("the calibration run did not reach every targeted layer" +
                       (" at least twice (CD-SVD needs consecutive steps)" if increments else "") +
                       "; make run() call the transformer for a few denoising steps")
    return {name: (sx / n, sy / n) for name, (sx, sy, n) in sums.items()}


def calibrate(transformer, config: ICCConfig, run=None) -> dict:
    """Factors for ``config``: SVD needs only the weights; CA-SVD and CD-SVD also run ``run()`` once to
    measure the channels (of the activations, or of their step-to-step increments)."""
    if config.method in ("ca-svd", "cd-svd") and run is None:
        raise ICCError(f"{config.method} calibration needs run=..., a callable that runs a few denoising steps")
    stats = None
    if config.method in ("ca-svd", "cd-svd"):
        stats = channel_stats(transformer, config, run, increments=config.method == "cd-svd")
    return compute_factors(transformer, config, stats)


def apply_icc_cache(transformer, config: ICCConfig, factors: dict | None = None) -> ICCState:
    """Attach ICC to ``transformer`` (factors from ``calibrate``; computed by SVD if omitted and method='svd')."""
    if getattr(transformer, "_hf_ext_icc", None) is not None:
        raise ICCError("ICC is already applied to this transformer; remove_icc_cache(transformer) first")
    linears = target_linears(transformer, config)
    if factors is None:
        factors = compute_factors(transformer, config)
    for name, (A, B) in factors.items():
        lin = linears.get(name)
        if lin is None or A.shape != (lin.out_features, A.shape[1]) or B.shape != (A.shape[1], lin.in_features):
            raise ICCError(f"calibration factors for '{name}' do not fit this transformer (layer "
                           f"{'missing' if lin is None else tuple(lin.weight.shape)}, factors {tuple(A.shape)} x "
                           f"{tuple(B.shape)}); they were computed for another model: recalibrate")
    if config.method != "reuse" and set(factors) != set(linears):
        raise ICCError(f"calibration factors cover {len(factors)} of {len(linears)} targeted layers; recalibrate")
    states = StateManager(ICCState)
    first = next(iter(linears))
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_StepHook(states, config), STEP_HOOK)
    for name, lin in linears.items():
        hook = _LinearHook(name, states, factors.get(name), config.threshold, name == first)
        HookRegistry.check_if_exists_or_initialize(lin).register_hook(hook, LINEAR_HOOK)
    transformer._hf_ext_icc = states
    return states


def icc_state(transformer, context: str = "default") -> ICCState:
    """The state of one cache context (steps, full steps, MACs executed by the targeted layers)."""
    states = transformer._hf_ext_icc
    states._state_cache.setdefault(context, ICCState())
    return states._state_cache[context]


def remove_icc_cache(transformer) -> None:
    """Detach every ICC hook; the transformer is exactly as before."""
    if getattr(transformer, "_hf_ext_icc", None) is None:
        return
    HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(STEP_HOOK, recurse=False)
    for m in transformer.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None and reg.get_hook(LINEAR_HOOK) is not None:
            reg.remove_hook(LINEAR_HOOK, recurse=False)
    transformer._hf_ext_icc = None


_OTHER_CACHES = ("cache", "broadcast", "taylorseer")


def enable_cache(pipe_or_transformer, config: ICCConfig, factors: dict | None = None) -> ICCState:
    """``apply_icc_cache`` on a pipeline's transformer (or a transformer), refusing to stack on another cache.

    diffusers' ``enable_cache`` only knows its own cache configs, so ICC has this entry point (as cache-dit does).
    """
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if getattr(transformer, "is_cache_enabled", False):
        raise ICCError(f"{type(transformer).__name__} already has a diffusers cache enabled "
                       f"({type(transformer._cache_config).__name__}); call disable_cache() first")
    for m in transformer.modules():
        reg = getattr(m, "_diffusers_hook", None)
        other = [n for n in (reg.hooks if reg else {}) if any(k in n for k in _OTHER_CACHES) and not n.startswith("hf_ext")]
        if other:
            raise ICCError(f"another cache hook ({other[0]}) is active on {type(transformer).__name__}; remove it "
                           "before enabling ICC")
    return apply_icc_cache(transformer, config, factors)
