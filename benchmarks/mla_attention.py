"""One layer's absorbed decode attention: our matmul path vs SDPA over a fused [latent; RoPE key] row.

SDPA's CPU flash kernel wants one head size for q, k and v, so the fused candidate stores each token's
[c_kv; k_rope] as one row, uses that row as K and as V (a view, no copy, as llama.cpp does) and drops the
RoPE part of the output. Shapes of SmolLM2 at 6.4x (9 heads, r 36, RoPE 24), 16k cached tokens.

    python benchmarks/mla_attention.py
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from run_all import save_result  # noqa: E402


def absorbed(q_lat, q_rope, c_kv, k_rope, mask, scale):
    """What MLAAttention._absorbed does for one token: heads folded into query rows, one matmul each."""
    B, H, T, r = q_lat.shape
    S = c_kv.shape[2]
    s = (q_lat.reshape(B, 1, H * T, r) @ c_kv.transpose(-1, -2)).view(B, H, T, S)
    s = s + (q_rope.reshape(B, 1, H * T, -1) @ k_rope.transpose(-1, -2)).view(B, H, T, S)
    s = (s.float() * scale).masked_fill(~mask, torch.finfo(torch.float32).min)
    return (s.softmax(-1).view(B, 1, H * T, S) @ c_kv).view(B, H, T, r)


def fused_sdpa(q_lat, q_rope, row, mask, scale, r):
    B, H, T, _ = q_lat.shape
    q = torch.cat([q_lat, q_rope], -1).reshape(B, 1, H * T, -1)
    out = F.scaled_dot_product_attention(q, row, row, attn_mask=mask.expand(B, 1, H * T, mask.shape[-1]), scale=scale)
    return out[..., :r].view(B, H, T, r)


def ms_per_call(fn, args, calls=20, reps=7):
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        times.append((time.perf_counter() - t) / calls * 1e3)
    return statistics.median(times)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mla_attention.json"))
    args = ap.parse_args()
    H, r, d_r, S = 9, 36, 24, args.context
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        g = torch.Generator().manual_seed(0)
        row = torch.randn(B, 1, S, r + d_r, generator=g)
        c_kv, k_rope = row[..., :r].contiguous(), row[..., r:].contiguous()  # our cache: two tensors
        q_lat, q_rope = torch.randn(B, H, 1, r, generator=g), torch.randn(B, H, 1, d_r, generator=g)
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[..., -100:] = False                                            # a static cache's empty slots
        ours, fused = (absorbed, (q_lat, q_rope, c_kv, k_rope, mask, 0.1)), (fused_sdpa, (q_lat, q_rope, row, mask, 0.1, r))
        err = float((ours[0](*ours[1]) - fused[0](*fused[1])).abs().max())
        res = {"batch": B, "context": S, "max_abs_diff": err}
        for name, (fn, a) in (("absorbed", ours), ("fused_sdpa", fused)):
            torch._dynamo.reset()
            res[f"{name}_eager_ms"] = ms_per_call(fn, a)
            res[f"{name}_compiled_ms"] = ms_per_call(torch.compile(fn, fullgraph=True, dynamic=False), a)
        rows.append(res)
        print(res, flush=True)
    save_result(args.out, "Absorbed decode attention, one layer (matmuls vs fused-row SDPA)",
                f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                {"One decode step, one layer": {
                    "note": f"ms per call, median of 7 x 20 calls, fp32; {H} heads, r {r}, RoPE {d_r}, {S} cached "
                            "tokens (the last 100 masked); compiled: torch.compile(fullgraph, static shapes).",
                    "rows": rows}})


if __name__ == "__main__":
    main()
