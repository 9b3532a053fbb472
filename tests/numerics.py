"""Tolerances for numerical assertions, derived from the dtypes, in one place.

Every numerical assertion in the suite uses one of three kinds of comparison, and says which and why.

1. **Bit for bit** (``torch.equal``) only where the result cannot depend on the machine: data movement
   (saving and loading tensors, indexing, copies), integer and boolean results, and one computation
   compared with *the same* computation, the same kernels on the same values, shapes and freshly allocated
   memory (the caching allocator aligns every allocation to 64 bytes). A CPU kernel is deterministic under
   those conditions at any ``ATEN_CPU_CAPABILITY`` and thread count.
2. **Round trips** (``assert_round_trip``): weights bit for bit, outputs in float64. A model loaded from disk
   can sit at other memory addresses than the one saved: diffusers maps safetensors files without copying,
   so its weights land at 4-byte offsets, and MKL/oneDNN take other SIMD code paths for unaligned operands
   (seen on an AMD EPYC with AVX512: identical weights gave fp32 outputs 1.4e-6 apart). In float64 the same
   reordering moves an output by about n·2^-53 of its scale, so the comparison can be tight and still
   machine-independent.
3. **Two computations equal in exact arithmetic** (a lossless conversion and its source, a fast path and its
   naive reference): a bound from the unit roundoff of the dtype and the length of the sums involved,
   written beside the assertion.

The unit roundoffs: ``U32 = 2^-24`` (float32), ``U64 = 2^-53`` (float64), ``UBF16 = 2^-8`` (bfloat16).
Higham's bound for a dot product of length n in any summation order is ``gamma(n) * sum |a_i b_i|`` with
``gamma(n) = n u / (1 - n u)``; two orders differ by at most twice that.
"""
from __future__ import annotations

import copy

import torch

U32 = 2.0 ** -24
U64 = 2.0 ** -53
UBF16 = 2.0 ** -8

# A round trip compares float64 outputs to this fraction of their largest magnitude. Two evaluations that
# differ only in summation order differ per dot product by at most 2 gamma(n) sum|a b| ~ 2 n U64: 2e-12 for
# the widest sums in the suite (n ~ 1e4, 3x3 convolutions over 512 channels included). The test networks are
# at most 32 layers deep, and the error grows by at most a small factor per layer, so 1e-10 holds with room
# to spare; a real defect is orders of magnitude larger: a weight or config value off by one float32 ulp
# already moves the output by ~6e-8 of its scale.
ROUND_TRIP_RTOL64 = 1e-10


# Two float32 computations of a tiny test model (hidden 32, 2 layers, vocab 128; tests/conftest.py) that are
# equal in exact arithmetic (a lossless conversion and its source, absorbed and expanded attention, a cache
# and a recompute) differ by at most about (dependent ops) x gamma(fan-in) x (term magnitude) on each side.
# Fan-ins are <= 128 (gamma = 7.6e-6), there are ~10 dependent ops from embedding to logits, and the terms
# and logits are O(1): about 1e-5 per side at worst, so 1e-4 absolute holds everywhere with room, and any
# real defect (a wrong rotation, a dropped term) moves logits by 1e-2 or more. This is also the house
# contract for lossless conversions in fp32 (DESIGN.md).
TINY_FP32_ATOL = 1e-4

# The same for a real checkpoint (SmolLM2-135M: 30 layers, fan-in up to 1536), as a fraction of the largest
# logit: two blockings of the same fp32 sums differ by ~sqrt(n) U32 per op (rounding errors add like a random
# walk: Higham and Mary, SIAM J. Sci. Comput. 2019), 2.3e-6 for n = 1536, and 30 layers add those like a
# random walk again (x sqrt(30)): ~1.3e-5 at the very worst corner, far less typically. 1e-5 of the largest
# logit (4e-4 on SmolLM2's logits of up to 40) is the bound; a defect moves logits by 1e-2 or more.
REAL_FP32_RTOL = 1e-5

# float64 checks of pure ops on small random inputs (dims <= 16, O(1) values): each sum is within
# gamma(16, U64) = 1.8e-15 of exact, and a handful of them are chained, so 1e-12 has 100x room.
OPS_FP64_ATOL = 1e-12


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of a length-n sum or dot product."""
    assert n * u < 1, "the bound needs n u < 1"
    return n * u / (1 - n * u)


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64: an error relative to the output's scale."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Every element within ``rtol`` times the largest magnitude of ``want``."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = max_rel(got, want)
    assert err <= rtol, f"max |got - want| is {err:.3e} of max |want|; the bound is {rtol:.1e}"


def assert_same_weights(loaded, original) -> None:
    """Every tensor of the state dict(s) equal bit for bit: saving and loading is data movement."""
    loaded = loaded if isinstance(loaded, (list, tuple)) else [loaded]
    original = original if isinstance(original, (list, tuple)) else [original]
    assert len(loaded) == len(original)
    for a, b in zip(loaded, original):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), (type(a).__name__, sa.keys() ^ sb.keys())
        bad = [k for k in sb if not torch.equal(sa[k], sb[k])]
        assert not bad, f"{type(a).__name__}: weights changed by the round trip: {bad[:5]}"


def float64_copy(module):
    """A float64 deep copy of a module or pipeline (the original is left as it is)."""
    return copy.deepcopy(module).to(torch.float64)


def modules_of(x) -> list:
    """The torch modules of a module, a list of modules, or a diffusers pipeline (its components)."""
    if isinstance(x, torch.nn.Module):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    return [v for _, v in sorted(x.components.items()) if isinstance(v, torch.nn.Module)]


def assert_round_trip(loaded, original, run, rtol: float = ROUND_TRIP_RTOL64) -> None:
    """A save/load round trip: weights bit for bit, and ``run(model)`` in float64 within ``rtol``.

    ``loaded`` and ``original`` are modules or diffusers pipelines; ``run`` takes one and returns a tensor.
    It is called on float64 copies of both, so memory alignment (see the module docstring) cannot move the
    result beyond ``rtol``.
    """
    assert_same_weights(modules_of(loaded), modules_of(original))
    got, want = run(float64_copy(loaded)), run(float64_copy(original))
    assert got.dtype == want.dtype == torch.float64, "run() must compute in the model's dtype (float64 here)"
    assert_close_rel(got, want, rtol)


def min_top2_gap(step_logits) -> float:
    """The smallest gap between the two largest logits over the steps of a greedy ``generate``
    (``output_logits=True``). Two runs whose logits agree to less than half of it pick the same tokens,
    so a token-for-token comparison of two computation paths is a bound only when this gap is larger
    than twice the paths' logit tolerance; the tests check that alongside."""
    return min(float((t[:, 0] - t[:, 1]).min()) for t in (s.double().topk(2, dim=-1).values for s in step_logits))


def greedy(model, ids, **kw):
    """A greedy ``generate`` that returns its per-step logits: (logits list, new tokens (B, steps))."""
    out = model.generate(ids, do_sample=False, return_dict_in_generate=True, output_logits=True, **kw)
    return out.logits, out.sequences[:, ids.shape[1]:]


def assert_greedy_agrees(a_logits, a_tokens, b_logits, b_tokens, atol: float, min_steps: int) -> int:
    """Greedy decoding by two computation paths, equal up to ties: ``*_logits`` are the per-step logits of
    ``generate(..., output_logits=True)`` ((B, V) each), ``*_tokens`` the new tokens (B, steps).

    Step by step the logits must agree within ``atol``; where every row's top-2 gap exceeds 2 atol, the
    chosen tokens must be equal. At the first step with a closer gap the two paths may legitimately pick
    different tokens, so the comparison stops there; at least ``min_steps`` steps must have been compared.
    Returns the number of steps compared."""
    steps = 0
    for t, (la, lb) in enumerate(zip(a_logits, b_logits)):
        la, lb = la.double(), lb.double()
        assert float((la - lb).abs().max()) <= atol, f"step {t}: logits differ by {float((la - lb).abs().max()):.2e}"
        top = la.topk(2, dim=-1).values
        if float((top[:, 0] - top[:, 1]).min()) <= 2 * atol:
            break
        assert torch.equal(a_tokens[:, t], b_tokens[:, t]), f"step {t}: tokens differ"
        steps += 1
    assert steps >= min_steps, f"only {steps} steps were decidable (top-2 gap > {2 * atol:.1e}); want {min_steps}"
    return steps
