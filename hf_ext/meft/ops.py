"""Reversible coupling math for MEFT (no modules, no configs).

One coupling (a "layer" of a reversible stack), with callables F and G and scales lam, beta:

    y1 = lam * x1 + F(x2)            x2 = (y2 - G(y1)) / beta
    y2 = beta * x2 + G(y1)           x1 = (y1 - F(x2)) / lam

``ReversibleStack`` runs many couplings under ``torch.no_grad`` and saves only the top outputs; its
backward walks the couplings in reverse, rebuilds each input from its output (the right column),
recomputes F and G with the RNG state they saw in the forward (dropout masks replay exactly), and
back-propagates locally. ``reversible_naive`` is the same network under ordinary autograd: the
reference that the gradients are tested against.

The two streams may be carried in a wider ``stream_dtype`` (e.g. float64) than F and G compute in:
the additions, the division by lam/beta and the stored outputs then lose far less, which is what
makes small lam/beta usable (the reconstruction error grows like 1/lam per layer).

How exact the reversal is rests on two things, and only the first is arithmetic:
- the stream sums are exact while a stream's bits fit float64's 53 (powers of two for lam/beta make the
  products exact; ``test_stream_arithmetic_is_exact`` proves a case);
- the backward must recompute F and G *bit for bit* as the forward computed them. A last-bit difference
  in a recomputed output is divided by lam (or beta) at its layer and by lam*beta at every layer below, so
  at small scales it grows into a wrong input. Whether kernels recompute bit for bit depends on the
  machine (CPU SIMD paths, nondeterministic GPU kernels); ``reconstruction_error`` recomputes exactly as
  the backward does, so the monitor that calls it sees what training will see.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Coupling:
    """One reversible layer: F, G (tensor -> tensor, same shape), their scales, and whether the streams
    swap afterwards (MEFT1/2 hand [y2, y1] to the next layer)."""

    F: Callable[[torch.Tensor], torch.Tensor]
    G: Callable[[torch.Tensor], torch.Tensor]
    lam: float
    beta: float
    swap: bool = False


class RngReplay:
    """Captures the CPU (and CUDA device's) RNG state now; ``with`` it later to replay that state, after
    which the RNG state of the moment is restored (dropout masks of a recomputation match the forward)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.state = self._get()

    def _get(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, state):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def __enter__(self):
        self._outer = self._get()
        self._set(self.state)

    def __exit__(self, *exc):
        self._set(self._outer)


def _call(fn, x, compute_dtype):
    return fn(x.to(compute_dtype)).to(x.dtype)


def coupling_forward(c: Coupling, x1, x2, compute_dtype):
    """(x1, x2) -> (y1, y2) [swapped if c.swap]; streams in their own dtype, F/G in ``compute_dtype``."""
    y1 = c.lam * x1 + _call(c.F, x2, compute_dtype)
    y2 = c.beta * x2 + _call(c.G, y1, compute_dtype)
    return (y2, y1) if c.swap else (y1, y2)


def coupling_inverse(c: Coupling, y1, y2, compute_dtype):
    """The exact algebraic inverse of ``coupling_forward`` (up to rounding)."""
    if c.swap:
        y1, y2 = y2, y1
    x2 = (y2 - _call(c.G, y1, compute_dtype)) / c.beta
    x1 = (y1 - _call(c.F, x2, compute_dtype)) / c.lam
    return x1, x2


def reversible_naive(couplings: list[Coupling], x1, x2, compute_dtype):
    """Ordinary autograd through the same couplings (stores every activation)."""
    for c in couplings:
        x1, x2 = coupling_forward(c, x1, x2, compute_dtype)
    return x1, x2


class ReversibleStack(torch.autograd.Function):
    """Autograd over a stack of couplings that saves only the top outputs.

    ``params`` are the trainable tensors used inside F and G, passed explicitly so autograd calls the
    backward even when the inputs need no gradient (frozen embeddings), and their grads are returned.
    ``monitor``, when given, keeps the inputs and is called with the relative error of their
    reconstruction at the end of the backward (one extra activation, only on monitored steps).
    """

    @staticmethod
    def forward(ctx, x1, x2, couplings, compute_dtype, monitor, *params):
        ctx.couplings, ctx.compute_dtype, ctx.rng = couplings, compute_dtype, []
        ctx.monitor, ctx.inputs = monitor, ((x1.detach(), x2.detach()) if monitor is not None else None)
        with torch.no_grad():
            for c in couplings:
                f_rng = RngReplay(x1.device)
                y1 = c.lam * x1 + _call(c.F, x2, compute_dtype)
                g_rng = RngReplay(x1.device)
                y2 = c.beta * x2 + _call(c.G, y1, compute_dtype)
                ctx.rng.append((f_rng, g_rng))
                x1, x2 = (y2, y1) if c.swap else (y1, y2)
        ctx.save_for_backward(x1, x2)
        ctx.params = params
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        cd, params = ctx.compute_dtype, ctx.params
        grads = [torch.zeros_like(p) if p.requires_grad else None for p in params]
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1.to(y1.dtype)
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2.to(y2.dtype)
        trainable = [p for p in params if p.requires_grad]
        for c, (f_rng, g_rng) in zip(reversed(ctx.couplings), reversed(ctx.rng)):
            if c.swap:
                y1, y2, dy1, dy2 = y2, y1, dy2, dy1
            with torch.enable_grad():                                       # G, its grads, and x2
                z1 = y1.detach().requires_grad_()
                with g_rng:
                    gz = _call(c.G, z1, cd)
                inputs = [z1, *trainable]
                g_grads = torch.autograd.grad(gz, inputs, dy2, allow_unused=True)
            x2 = ((y2 - gz.detach()) / c.beta).detach()
            dy1_total = dy1 if g_grads[0] is None else dy1 + g_grads[0]
            with torch.enable_grad():                                       # F, its grads, and x1
                z2 = x2.requires_grad_()
                with f_rng:
                    fz = _call(c.F, z2, cd)
                f_grads = torch.autograd.grad(fz, [z2, *trainable], dy1_total, allow_unused=True)
            x1 = ((y1 - fz.detach()) / c.lam).detach()
            _accumulate(grads, params, g_grads[1:])
            _accumulate(grads, params, f_grads[1:])
            dy1, dy2 = c.lam * dy1_total, c.beta * dy2 + (0 if f_grads[0] is None else f_grads[0])
            y1, y2 = x1, x2.detach()
        if ctx.monitor is not None:
            a1, a2 = ctx.inputs
            scale = torch.maximum(a1.abs().max(), a2.abs().max()).clamp_min(1e-30)
            ctx.monitor(float(torch.maximum((y1 - a1).abs().max(), (y2 - a2).abs().max()) / scale))
        del ctx.couplings, ctx.rng, ctx.params, ctx.inputs
        return (dy1, dy2, None, None, None, *grads)


def _accumulate(grads, params, new):
    it = iter(new)
    for i, p in enumerate(params):
        if p.requires_grad:
            g = next(it)
            if g is not None:
                grads[i] += g


def reconstruction_error(couplings: list[Coupling], x1, x2, compute_dtype) -> float:
    """max |x - inverse(forward(x))| / max |x| over both streams, through the whole stack and back, with
    the RNG of every F and G replayed: the cheap check of whether a setting gives trustworthy gradients.

    The forward runs as ``ReversibleStack.forward`` does (no grad) and the inverse as its backward does
    (grad enabled, inputs that require grad), so a kernel that rounds differently in the two modes shows
    up here as it would in training. The global RNG state is left as it was, so a check does not change
    the dropout masks of training."""
    with torch.no_grad(), RngReplay(x1.device):
        y1, y2, rngs = x1, x2, []
        for c in couplings:
            rngs.append(RngReplay(x1.device))
            y1 = c.lam * y1 + _call(c.F, y2, compute_dtype)
            rngs.append(RngReplay(x1.device))
            y2 = c.beta * y2 + _call(c.G, y1, compute_dtype)
            y1, y2 = (y2, y1) if c.swap else (y1, y2)
        for c in reversed(couplings):
            y1, y2 = (y2, y1) if c.swap else (y1, y2)
            with rngs.pop():
                y2 = (y2 - _recompute(c.G, y1, compute_dtype)) / c.beta
            with rngs.pop():
                y1 = (y1 - _recompute(c.F, y2, compute_dtype)) / c.lam
        scale = torch.maximum(x1.abs().max(), x2.abs().max()).clamp_min(1e-30)
        return float(torch.maximum((y1 - x1).abs().max(), (y2 - x2).abs().max()) / scale)


def _recompute(fn, x, compute_dtype):
    """F or G as the reversible backward calls it: grad enabled, on an input that requires grad."""
    with torch.enable_grad():
        return _call(fn, x.detach().requires_grad_(), compute_dtype).detach()
