"""Timestep-aware post-training quantization of a diffusers denoiser (TFMQ-DM), simulated and with torchao.

Paper: TFMQ-DM, https://arxiv.org/abs/2311.16503. Three ways to quantize the same linear layers:

- **naive PTQ** (``calibration="minmax", temporal="quantize"``): one activation range per layer, the
  min/max over every calibration step; the temporal layers (time-embedding MLP, adaLN projections) are
  quantized like the rest.
- **finite-set calibration** (``calibration="finite-set"``): a sampler visits a finite set of time steps,
  so each layer gets one activation range per step, chosen at run time from the call's time step.
- **TFMQ, cache-based** (``temporal="cache"``): finite-set ranges, and the temporal features come from
  the full-precision per-step table (``cache.py``) instead of quantized temporal layers, so quantization
  never disturbs them. ``temporal="auto"`` is the disturbance-aware choice per temporal module: serve it
  from the table when quantizing it moves its output by more than ``max_disturbance`` (relative), else
  quantize it like any layer (its table rows are then not needed).

The quantize-dequantize here is simulated in float32 (it measures accuracy; every linear is still a fp32
matmul). Real int8 kernels: ``quantize_torchao`` (torchao W8A8, dynamic activations); torchao has no x86
kernel for W4A8 in its PyPI build, so W4A8 is simulated only.

Example:
    >>> from hf_ext.temporal.quant import TFMQConfig, quantize_tfmq
    >>> state = quantize_tfmq(transformer, TFMQConfig(weight_bits=4), scheduler, 25, run=calibration_run)  # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import HookRegistry, ModelHook

from .cache import apply_temporal_cache, remove_temporal_cache, schedule_timesteps
from .ops import SUPPORTED_BITS, act_qparams, dequant_weight, fake_quant_act, fake_quant_weight
from .tib import TemporalError, find_tib, tib_outputs

CLOCK_HOOK, QUANT_HOOK = "hf_ext_tfmq_clock", "hf_ext_tfmq_linear"


@dataclass
class TFMQConfig:
    """Timestep-aware PTQ (https://arxiv.org/abs/2311.16503).

    Args:
        weight_bits: 8 or 4 (symmetric, per output channel).
        act_bits: activation bits (asymmetric per tensor); 8.
        calibration: ``finite-set`` (a range per sampler step) or ``minmax`` (one range over all steps).
        temporal: ``cache`` (temporal features from the full-precision table), ``quantize`` (temporal layers
            quantized like the rest) or ``auto`` (per temporal module, by measured disturbance).
        max_disturbance: ``auto``: cache a temporal module whose quantized output is off by more than this.
        keep_fp: regular expression of linear layers left in full precision (the final output projection).
    """

    weight_bits: int = 8
    act_bits: int = 8
    calibration: str = "finite-set"
    temporal: str = "cache"
    max_disturbance: float = 0.01
    keep_fp: str = r"(^|\.)proj_out(_2)?$|(^|\.)conv_out$"

    def __post_init__(self):
        if self.weight_bits not in SUPPORTED_BITS:
            raise TemporalError(f"weight_bits={self.weight_bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.act_bits != 8:
            raise TemporalError(f"act_bits={self.act_bits} is not supported; activations are quantized to 8 bits")
        if self.calibration not in ("finite-set", "minmax"):
            raise TemporalError(f"calibration '{self.calibration}' is unknown; use 'finite-set' or 'minmax'")
        if self.temporal not in ("cache", "quantize", "auto"):
            raise TemporalError(f"temporal '{self.temporal}' is unknown; use 'cache', 'quantize' or 'auto'")


class _Clock(ModelHook):
    """On the model: which sampler step this call is (every row of a call is at the same step)."""

    def __init__(self, timesteps: torch.Tensor, signature: inspect.Signature):
        super().__init__()
        self.timesteps, self.signature, self.step = timesteps.double(), signature, 0

    def pre_forward(self, module, *args, **kwargs):
        t = self.signature.bind_partial(*args, **kwargs).arguments.get("timestep")
        t = torch.as_tensor(t).double().reshape(-1)
        hit = (t[:1, None] == self.timesteps[None]).nonzero()
        if len(hit) == 0 or not torch.all(t == t[0]):
            raise TemporalError(f"time step {t[0].item()} is not one of this quantization's calibrated steps (or rows "
                                "differ in t); calibrate for the schedule you sample with")
        self.step = int(hit[0, 1])
        return args, kwargs


class _QuantLinear(ModelHook):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, clock: _Clock, bits: int):
        super().__init__()
        self.weight, self.scale, self.zero, self.clock, self.bits = weight, scale, zero, clock, bits

    def new_forward(self, module, x):
        s = self.clock.step if len(self.scale) > 1 else 0
        return F.linear(fake_quant_act(x, self.scale[s], self.zero[s], self.bits), self.weight, module.bias)


def _targets(model, config: TFMQConfig, cached=()) -> dict[str, torch.nn.Linear]:
    """Linear layers to quantize: all but ``keep_fp`` and those inside temporal modules served from the table."""
    keep = re.compile(config.keep_fp)
    inside = lambda n: any(n == c or n.startswith(c + ".") for c in cached)  # noqa: E731
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not keep.search(n) and not inside(n)}


@torch.no_grad()
def calibrate_ranges(model, config: TFMQConfig, timesteps: torch.Tensor, run, cached=()) -> dict[str, torch.Tensor]:
    """Input (min, max) of every targeted linear (outside the ``cached`` temporal modules): ``(S, 2)`` per step
    (finite-set) or ``(1, 2)`` over all steps (minmax), over ``run()``."""
    clock = _Clock(timesteps, inspect.signature(model.forward))
    reg = HookRegistry.check_if_exists_or_initialize(model)
    reg.register_hook(clock, CLOCK_HOOK)
    S = len(timesteps) if config.calibration == "finite-set" else 1
    ranges, handles = {}, []
    for name, lin in _targets(model, config, cached).items():
        def pre(mod, args, name=name):
            r = ranges.setdefault(name, torch.tensor([[float("inf"), -float("inf")]]).repeat(S, 1))
            s = clock.step if S > 1 else 0
            r[s, 0] = min(r[s, 0], args[0].min().item())
            r[s, 1] = max(r[s, 1], args[0].max().item())
        handles.append(lin.register_forward_pre_hook(pre))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        reg.remove_hook(CLOCK_HOOK, recurse=False)
    for name, r in ranges.items():
        if not torch.isfinite(r).all():
            raise TemporalError(f"the calibration run did not reach every step for {name}; run the whole schedule")
    return ranges


def attach_quantizers(model, config: TFMQConfig, ranges: dict, timesteps: torch.Tensor, qweights: dict | None = None) -> _Clock:
    """Quantize-dequantize hooks on every layer in ``ranges``; ``qweights`` ({name: (codes, scales)}) are
    computed from the weights when not given (they are when loading a saved quantization)."""
    clock = _Clock(timesteps, inspect.signature(model.forward))
    HookRegistry.check_if_exists_or_initialize(model).register_hook(clock, CLOCK_HOOK)
    mods = dict(model.named_modules())
    for name, r in ranges.items():
        lin = mods[name]
        if qweights is not None and name in qweights:
            w = dequant_weight(*qweights[name], config.weight_bits)
        else:
            w, q, scale = fake_quant_weight(lin.weight, config.weight_bits)
            if qweights is not None:
                qweights[name] = (q, scale)
        scale, zero = act_qparams(r[:, 0], r[:, 1], config.act_bits)
        hook = _QuantLinear(w.to(lin.weight.dtype), scale, zero, clock, config.act_bits)
        HookRegistry.check_if_exists_or_initialize(lin).register_hook(hook, QUANT_HOOK)
    return clock


@torch.no_grad()
def temporal_disturbance(model, config: TFMQConfig, ranges: dict, timesteps: torch.Tensor) -> dict[str, float]:
    """Relative error ||q(f) - f|| / ||f|| of each temporal module's output when its layers are quantized,
    over every step (and label) of the schedule."""
    tib = find_tib(model)
    L = tib.num_labels or 1
    labels = torch.arange(tib.num_labels) if tib.num_labels else None
    ref, got = [], []
    for s, t in enumerate(timesteps):
        ref.append(tib_outputs(model, tib, t.repeat(L), labels))
    clock = attach_quantizers(model, config, ranges, timesteps)
    try:
        for s, t in enumerate(timesteps):
            clock.step = s
            got.append(tib_outputs(model, tib, t.repeat(L), labels))
    finally:
        remove_tfmq(model)
    flat = lambda v: torch.cat([x.flatten() for x in v]) if isinstance(v, tuple) else v.flatten()  # noqa: E731
    out = {}
    for name in tib.modules:
        a = torch.cat([flat(r[name]) for r in ref])
        b = torch.cat([flat(g[name]) for g in got])
        out[name] = float((b - a).norm() / a.norm().clamp_min(1e-12))
    return out


def quantize_tfmq(model, config: TFMQConfig, scheduler, num_inference_steps: int, run) -> dict:
    """Quantize ``model`` (simulated) for this schedule; ``run()`` samples with it once for calibration.

    Returns the state ``{"config", "ranges", "qweights" (int8 codes, scales), "cached" (temporal modules
    served from the table), "disturbance", "timesteps"}``, which ``io.save_tfmq`` writes.
    """
    if getattr(model, "_hf_ext_tfmq", None) is not None:
        raise TemporalError("TFMQ is already applied; remove_tfmq(model) first")
    timesteps = schedule_timesteps(scheduler, num_inference_steps)
    cached, disturbance = [], {}
    if config.temporal == "cache":
        cached = find_tib(model).modules
    ranges = calibrate_ranges(model, config, timesteps, run, cached)
    if config.temporal == "auto":
        disturbance = temporal_disturbance(model, config, ranges, timesteps)
        cached = [m for m, d in disturbance.items() if d > config.max_disturbance]
        inside = set(_targets(model, config)) - set(_targets(model, config, cached))
        ranges = {n: r for n, r in ranges.items() if n not in inside}
    if cached:
        apply_temporal_cache(model, scheduler, num_inference_steps, modules=cached)
    qweights: dict = {}
    attach_quantizers(model, config, ranges, timesteps, qweights)
    model._hf_ext_tfmq = {"config": config, "ranges": ranges, "qweights": qweights, "cached": cached,
                          "disturbance": disturbance, "timesteps": timesteps}
    return model._hf_ext_tfmq


def remove_tfmq(model) -> None:
    """Detach every TFMQ hook (and the temporal cache it applied)."""
    root = HookRegistry.check_if_exists_or_initialize(model)
    if root.get_hook(CLOCK_HOOK) is not None:
        root.remove_hook(CLOCK_HOOK, recurse=False)
    for m in model.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None and reg.get_hook(QUANT_HOOK) is not None:
            reg.remove_hook(QUANT_HOOK, recurse=False)
    if getattr(model, "_hf_ext_tfmq", None) is not None:
        remove_temporal_cache(model)
    model._hf_ext_tfmq = None


def quantize_torchao(model, weight_bits: int = 8, config: TFMQConfig | None = None) -> str:
    """Real int8 kernels: torchao W8A8 (int8 weights per channel, int8 dynamic per-token activations) on the
    targeted linears. Returns what ran. W4A8 has no x86 kernel in torchao's PyPI build: a clear error."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if weight_bits != 8:
        raise TemporalError(f"torchao has no x86 CPU kernel for W{weight_bits}A8 in its PyPI build; use the "
                            "simulated path (quantize_tfmq) to measure its accuracy")
    names = set(_targets(model, config or TFMQConfig()))
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in names)
    return "torchao Int8DynamicActivationInt8WeightConfig (int8 x int8 matmul kernels)"
