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

import functools
import inspect
import re

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager

from .config import ICCConfig, ICCError
from .ops import icc_step_projected, taylor_forecast

STEP_HOOK = "hf_ext_icc_step"
LINEAR_HOOK = "hf_ext_icc_linear"


class ICCState(BaseState):
    """Per cache context: the step counter, this step's mode, and each layer's last full step (ẑ = x̂ Bᵀ, ŷ)."""

    def __init__(self):
        self.reset()

    def reset(self):
        # macs: what the cached layers executed (linear targets), plus the corrections (module targets)
        self.step, self.full, self.cache, self.macs, self.full_steps = 0, True, {}, 0, 0
        self.last_t = None


@functools.lru_cache(maxsize=None)
def _timestep_position(cls) -> int | None:
    """Where ``timestep`` sits among the positional arguments of ``cls.forward`` (after self), if anywhere."""
    names = list(inspect.signature(cls.forward).parameters)[1:]
    return names.index("timestep") if "timestep" in names else None


def call_timestep(module, args, kwargs) -> float | None:
    """The ``timestep`` a diffusers transformer call was given (its first element), or None. Positional
    arguments are matched by the model's forward signature (DiT takes it second, PixArt and SD3 third)."""
    t = kwargs.get("timestep")
    if t is None:
        i = _timestep_position(type(module))
        t = args[i] if i is not None and i < len(args) else None
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return float(t) if isinstance(t, (int, float)) else None


def target_layers(transformer: torch.nn.Module, config: ICCConfig) -> dict[str, torch.nn.Module]:
    """The cached layers: linear layers (``granularity="linear"``) or any modules (``"module"``) named by targets."""
    pattern = re.compile(config.targets)
    linear = config.granularity == "linear"
    found = {n: m for n, m in transformer.named_modules()
             if (isinstance(m, torch.nn.Linear) or not linear) and n and pattern.search(n)}
    if not found:
        what = ("linear layer matching the ICC targets (attention q/k/v/out and MLP layers" if linear else
                "module matching the ICC module targets (attention and feed-forward modules")
        raise ICCError(f"{type(transformer).__name__} has no {what} inside transformer_blocks); pass targets=... "
                       "naming its layers")
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
        t = call_timestep(module, args, kwargs)
        if t is not None and st.last_t is not None and t > st.last_t:
            st.reset()                 # timesteps only fall within a sampling run: this call starts a new one
        st.last_t = t
        st.full = self.config.is_full(st.step) or not st.cache
        if self.config.threshold is not None and st.cache and st.step >= self.config.warmup:
            st.full = False  # decided by the first targeted layer (see _CacheHook)
        st.step += 1
        st.full_steps += st.full
        return args, kwargs

    def reset_state(self, module):
        self.states.reset()
        return module


def _forecast(hist: list, k: int, step: int, order: int):
    """Field ``k`` of the history entries (step, ẑ, ŷ) extrapolated to ``step``; tuples element by element."""
    pts = [(h[0], h[k]) for h in hist]
    if pts[-1][1] is None or order == 0:
        return pts[-1][1]
    if isinstance(pts[-1][1], tuple):
        return tuple(taylor_forecast([(s, v[i]) for s, v in pts], step, order) for i in range(len(pts[-1][1])))
    return taylor_forecast(pts, step, order)


class _CacheHook(ModelHook):
    """One cached layer (a linear, or a whole attention / MLP module): full steps run it and record; cached
    steps return the forecast output y_f (ŷ when ``forecast=0``), corrected by A (B x - ẑ_f) when factored."""

    _is_stateful = True

    def __init__(self, name: str, states: StateManager, factors: tuple | None, config: ICCConfig, first: bool):
        super().__init__()
        self.name, self.states, self.config, self.first = name, states, config, first
        self.A, self.B = factors if factors is not None else (None, None)

    def new_forward(self, module, x, *args, **kwargs):
        # the cache holds, per layer: (x.shape, [(step, ẑ = x̂ Bᵀ or None, ŷ)] of the last full steps, x̂ if this
        # layer decides adaptive steps)
        st, cfg = self.states.get_state(), self.config
        hit = st.cache.get(self.name)
        if hit is not None and hit[0] != x.shape:
            hit = None                                            # batch or resolution changed: recompute
        if hit is not None and self.first and cfg.threshold is not None and not st.full:
            rel = ((x - hit[2]).norm() / hit[2].norm().clamp_min(1e-12)).item()
            st.full = rel > cfg.threshold
            st.full_steps += st.full
        rows, linear = x[..., 0].numel(), isinstance(module, torch.nn.Linear)
        step = st.step - 1                                        # this call's index (the step hook counted it)
        if st.full or hit is None:
            y = self.fn_ref.original_forward(x, *args, **kwargs)
            z = None
            if self.A is not None:
                self.A, self.B = self.A.to(x.device), self.B.to(x.device)
                z = x.reshape(-1, x.shape[-1]).to(self.B.dtype) @ self.B.T           # (N, r)
                st.macs += rows * x.shape[-1] * self.A.shape[1]
            y_keep = tuple(t.detach() for t in y) if isinstance(y, tuple) else y.detach()
            hist = ([] if hit is None else hit[1])[-cfg.forecast:] if cfg.forecast else []
            keep_x = x.detach() if self.first and cfg.threshold is not None else None
            st.cache[self.name] = (x.shape, hist + [(step, z, y_keep)], keep_x)
            st.macs += rows * module.in_features * module.out_features if linear else 0
            return y
        y_f = _forecast(hit[1], 2, step, cfg.forecast)            # (..., out), or a tuple of outputs
        if self.A is None:
            return y_f
        z_f = _forecast(hit[1], 1, step, cfg.forecast)            # (N, r)
        st.macs += rows * (x.shape[-1] + self.A.shape[0]) * self.A.shape[1]
        if isinstance(y_f, tuple):
            return (icc_step_projected(x, z_f, y_f[0], self.A, self.B),) + y_f[1:]
        return icc_step_projected(x, z_f, y_f, self.A, self.B)

    def reset_state(self, module):
        self.states.reset()
        return module


def apply_icc_cache(transformer, config: ICCConfig, factors: dict | None = None) -> ICCState:
    """Attach ICC to ``transformer`` (factors from ``calibrate``; computed by SVD if omitted and method='svd')."""
    if getattr(transformer, "_hf_ext_icc", None) is not None:
        raise ICCError("ICC is already applied to this transformer; remove_icc_cache(transformer) first")
    linears = target_layers(transformer, config)
    if factors is None:
        from .calibration import compute_factors

        factors = compute_factors(transformer, config)
    for name, (A, B) in factors.items():
        lin = linears.get(name)
        shape = (getattr(lin, "out_features", A.shape[0]), getattr(lin, "in_features", B.shape[1]))
        if lin is None or A.shape != (shape[0], A.shape[1]) or B.shape != (A.shape[1], shape[1]):
            raise ICCError(f"calibration factors for '{name}' do not fit this transformer (layer "
                           f"{'missing' if lin is None else shape}, factors {tuple(A.shape)} x "
                           f"{tuple(B.shape)}); they were computed for another model: recalibrate")
    if config.method != "reuse" and set(factors) != set(linears):
        raise ICCError(f"calibration factors cover {len(factors)} of {len(linears)} targeted layers; recalibrate")
    states = StateManager(ICCState)
    first = next(iter(linears))
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_StepHook(states, config), STEP_HOOK)
    for name, lin in linears.items():
        hook = _CacheHook(name, states, factors.get(name), config, name == first)
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
