"""``MLAAttention``, the module that runs in ``MLAForCausalLM``, against ``ops.mla_attention_naive``.

Same weights, same inputs: the reference rebuilds every step from the module's weights in float64 (query path,
latent and its norm, decoupled RoPE keys, per-head key scales) and runs the naive expanded attention. The module
runs in float32 along each of its paths: expanded (eager and SDPA, with and without autograd) and absorbed, over
the whole sequence at once and chunk by chunk through its latent cache.
"""
from __future__ import annotations

import math

import pytest
import torch

from hf_ext.mla import MLAConfig, ops
from hf_ext.mla.modeling_mla import MLAAttention, MLARotaryEmbedding
from numerics import U32, assert_close_rel, gamma

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

h, H, N_KV, D, R, D_N, D_R = 32, 4, 2, 8, 12, 8, 4
T = 11                               # tokens; with the cache: a prefill of 5, a chunk of 3, then 3 decode steps
VARIANTS = {   # every query / key path of MLAAttention; rope_freq_index picks pairs other than the first ones
    "shared": dict(rope_freq_index=[[[1, 3]]]),
    "per_kv_head": dict(rope_key_sharing="per_kv_head", rope_freq_index=[[[0, 2], [1, 3]]]),
    "bias": dict(attention_bias=True, o_proj_bias=True, rope_freq_index=[[[0, 3]]]),
    "q_lora": dict(q_lora_rank=16, latent_norm=True, rope_freq_index=[[[1, 2]]]),   # DeepSeek-V3's form
    "q_lora_no_norm": dict(q_lora_rank=16),
    "latent_norm": dict(latent_norm=True),
    "qk_norm": dict(qk_norm=True, rope_freq_index=[[[1, 3]]], rope_head_index=[[[1, 0]]]),   # Qwen3's form
}

# The bound. Each output element ends a chain of at most k = 10 dependent float32 steps (query latent, its
# norm, query; latent, its norm, up-projection; RoPE; score; softmax; probability-weighted sum; o_proj).
# Each step rounds within gamma(n) of the sum of its terms' magnitudes (Higham), n <= 32 here (hidden size,
# H * d_v; the sums over keys have S <= 11 terms). The weights are N(0, 1/fan_in) and the inputs N(0, 1),
# so every stage's outputs are O(1) and a sum of n random-sign terms of magnitude sum s has |sum| ~ s /
# sqrt(n): relative to the output's scale each step adds at most sqrt(n) gamma(n). Softmax turns an
# absolute score error e into a relative probability error of at most 2e, and scores here are O(1), so it
# amplifies nothing. Hence k sqrt(n) gamma(n) = 1.1e-4 of max|out| (measured: <= 5e-7). Defects move the
# output by far more: a softmax scale 1% off by 5e-3, one RoPE frequency off by 7e-3 (the last test), a
# lost key bias by 0.2, a skipped latent norm by 0.7.
RTOL = 10 * math.sqrt(32) * gamma(32, U32)


def module(variant: str, impl: str = "sdpa", absorb: str = "never", seed: int = 0) -> MLAAttention:
    kw = dict(vocab_size=16, hidden_size=h, intermediate_size=16, num_hidden_layers=1, num_attention_heads=H,
              num_key_value_heads=N_KV, head_dim=D, kv_lora_rank=R, qk_nope_head_dim=D_N, qk_rope_head_dim=D_R,
              v_head_dim=D, rms_norm_eps=1e-5, absorb=absorb)
    cfg = MLAConfig(**{**kw, **VARIANTS[variant]})
    cfg._attn_implementation = impl
    attn = MLAAttention(cfg, layer_idx=0).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):        # gains away from 1, so a norm that is skipped shows
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:                                   # N(0, 1/fan_in): O(1) activations at every stage
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if p.dim() > 1 else h))
    return attn


def rms_norm(x, weight, eps):
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def reference(attn: MLAAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention output for x (B, T, h) in float64 from attn's weights, via ops.mla_attention_naive."""
    cfg, W = attn.config, {k: v.double() for k, v in attn.state_dict().items()}
    lin = lambda name, y: y @ W[f"{name}.weight"].T + W.get(f"{name}.bias", 0)  # noqa: E731
    n_rope, eps = cfg.n_rope_heads, cfg.rms_norm_eps
    outs = []
    for xb in x.double():                                                   # (T, h): the naive op has no batch
        n = xb.shape[0]
        if cfg.qk_norm:
            q = rms_norm(lin("q_proj", xb).view(n, H, D), W["q_norm.weight"], eps)          # (T, H, D)
            q = torch.einsum("thd,hed->the", q, W["q_head_proj"])                            # (T, H, d_n + d_r)
        elif cfg.q_lora_rank:
            c_q = lin("q_a_proj", xb)                                                        # (T, q_lora_rank)
            c_q = rms_norm(c_q, W["q_a_layernorm.weight"], cfg.latent_norm_eps) if cfg.latent_norm else c_q
            q = lin("q_b_proj", c_q).view(n, H, D_N + D_R)
        else:
            q = lin("q_proj", xb).view(n, H, D_N + D_R)
        kv = lin("kv_a_proj", xb)                                            # (T, r + n_rope d_r)
        c = rms_norm(kv[:, :R], W["kv_a_layernorm.weight"], cfg.latent_norm_eps) if cfg.latent_norm else kv[:, :R]
        k_rope = kv[:, R:].view(n, n_rope, D_R)                              # (T, n_rope, d_r)
        s = None
        if cfg.qk_norm:   # s_g = 1 / rms of source key head g; RoPE pair k of head m takes s of head g(m, k)
            s = torch.rsqrt(lin("k_proj", xb).view(n, N_KV, D).pow(2).mean(-1) + eps)       # (T, n_kv)
            s_pair = s[:, attn.rope_head_index]                              # (T, n_rope, d_r/2)
            k_rope = k_rope * torch.cat([s_pair, s_pair], -1)
        inv_freq = MLARotaryEmbedding.compute_inv_freq(cfg)[0].double()      # (D/2,)
        qr, kr = torch.empty(H, n, D_R, dtype=torch.float64), torch.empty(n_rope, n, D_R, dtype=torch.float64)
        for m in range(n_rope):                                              # RoPE head m: its own pairs
            cos, sin = ops.rope_cos_sin(inv_freq[attn.rope_freq_index[m]], torch.arange(n))   # (T, d_r/2)
            kr[m] = ops.apply_rope_naive(k_rope[:, m], cos, sin)
            heads = slice(m * H // n_rope, (m + 1) * H // n_rope)
            qr[heads] = ops.apply_rope_naive(q[:, heads, D_N:].transpose(0, 1), cos, sin)
        w = W["kv_b_proj.weight"].view(H, D_N + D, R)
        out = torch.empty(n, H, D, dtype=torch.float64)
        for g in range(N_KV):                                                # the heads of KV head g
            hs = slice(g * H // N_KV, (g + 1) * H // N_KV)
            w_uk, w_uv, lat = w[hs, :D_N], w[hs, D_N:], c
            if s is not None:   # keys s_g (W_UK c), values W_UV c: one latent [s_g c, c] with W_UK, W_UV padded
                lat = torch.cat([c * s[:, g:g + 1], c], -1)                  # (T, 2r)
                w_uk, w_uv = torch.cat([w_uk, 0 * w_uk], -1), torch.cat([0 * w_uv, w_uv], -1)
            out[:, hs] = ops.mla_attention_naive(q[:, hs, :D_N].transpose(0, 1), qr[hs], lat,
                                                 kr[g * n_rope // N_KV], w_uk, w_uv, cfg.softmax_scale)
        outs.append(lin("o_proj", out.flatten(1)))                           # (T, h)
    return torch.stack(outs)


def run(attn: MLAAttention, x: torch.Tensor, chunks=None) -> torch.Tensor:
    """attn on x (B, T, h) as MLAModel calls it: at once (chunks None), or chunk by chunk through a latent cache."""
    from transformers.cache_utils import DynamicCache

    rope = MLARotaryEmbedding(attn.config)
    cache, outs, t = DynamicCache(config=attn.config) if chunks else None, [], 0
    for n in chunks or [x.shape[1]]:
        pos = torch.arange(t, t + n)[None]
        # create_causal_mask's answer: for SDPA None where is_causal says it all (no past, or one new token),
        # else a boolean (1, 1, n, t + n) mask, True = attend
        sdpa_skip = attn.config._attn_implementation == "sdpa" and (t == 0 or n == 1)
        mask = None if sdpa_skip else (torch.arange(t + n)[None] <= pos[0, :, None])[None, None]
        outs.append(attn(x[:, t:t + n], rope(x, pos), mask, cache)[0])
        t += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("path", ["eager", "sdpa", "sdpa_grad", "absorbed"])
@pytest.mark.parametrize("cached", [False, True])
def test_attention_module_equals_naive(variant, path, cached):
    attn = module(variant, impl="eager" if path == "eager" else "sdpa", absorb="always" if path == "absorbed" else "never")
    x = torch.randn(2, T, h, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(path == "sdpa_grad"):        # autograd on: the unpadded training path
        got = run(attn, x, chunks=[5, 3, 1, 1, 1] if cached else None)
    assert_close_rel(got, reference(attn, x), RTOL)           # the bound: see RTOL


def test_auto_absorbs_decode_only_and_the_bound_catches_a_wrong_rope_pair():
    """absorb="auto" runs decode absorbed and prefill expanded, equal to the naive op; a module whose RoPE
    keeps another pair than the reference's (the kind of defect RTOL must catch) is far outside the bound."""
    attn, x = module("shared", absorb="auto"), torch.randn(2, T, h, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_rel(run(attn, x, chunks=[8, 1, 1, 1]), reference(attn, x), RTOL)
        want = reference(attn, x)
        attn.rope_freq_index.copy_(torch.tensor([[1, 2]]))              # frequency 3 -> 2 in one pair
        err = float((run(attn, x) - want).abs().max() / want.abs().max())
    assert err > 30 * RTOL, err                                         # 7e-3: 67 RTOL
