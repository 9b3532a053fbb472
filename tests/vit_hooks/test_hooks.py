"""HookedVision parity on tiny random configs of every supported family, patching, and bad input.

Tolerances (tests/numerics.py): a hooked run with hooks that only record is the model's own computation on the
same values and shapes, so it is compared bit for bit (kind 1), as are cached tensors that are the very
values another hook point passes on. The unfused attention path (taken when attention internals are hooked)
and the fused kernels are equal in exact arithmetic only: their outputs, through 2 layers of width 32, agree
within TINY_FP32_ATOL, and single ops (a softmax pattern, pattern @ v) within 1e-5; a killed head or a wrong
hook point moves them by 1e-2 or more.
"""
from __future__ import annotations

import pytest
import timm
import torch
from transformers import (BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                          SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTModel)

from conftest import tiny_causal_lm
from numerics import TINY_FP32_ATOL, U32

from hf_ext.vit_hooks import HookedVision, HookError

pytestmark = pytest.mark.numerics   # rerun under another ATEN_CPU_CAPABILITY by `make test`

V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
TIMM = dict(pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4, num_classes=10)


def _timm(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TIMM, **kw}).eval()


def _hf(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    return cls(cfg_cls(**{**V, **kw})).eval()


MODELS = {  # name -> (builder, input builder, out-projection of the attention branch for the manual edit)
    "timm-vit": (lambda: _timm("vit_tiny_patch16_224"), "image", "attn.proj"),
    "timm-deit-reg": (lambda: _timm("vit_small_patch16_224", reg_tokens=4, no_embed_class=True), "image", "attn.proj"),
    "timm-eva": (lambda: _timm("eva02_tiny_patch14_224", patch_size=8), "image", "attn.proj"),
    "hf-vit": (lambda: _hf(ViTModel, ViTConfig), "pixels", "attention.o_proj"),
    "hf-dinov2": (lambda: _hf(Dinov2Model, Dinov2Config), "pixels", "attention.o_proj"),
    "hf-clip": (lambda: _hf(CLIPVisionModel, CLIPVisionConfig), "pixels", "self_attn.out_proj"),
    "hf-siglip": (lambda: _hf(SiglipVisionModel, SiglipVisionConfig), "pixels", "self_attn.out_proj"),
    "hf-bert": (lambda: _hf(BertModel, BertConfig, vocab_size=100), "ids", "attention.output.dense"),
    "hf-llama": (lambda: tiny_causal_lm(), "ids", "self_attn.o_proj"),
}


def _inputs(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return (torch.randn(2, 3, 32, 32, generator=g),), {}
    if kind == "pixels":
        return (), {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return (), {"input_ids": torch.randint(0, 100, (2, 12), generator=g)}


def _out(o):
    return o if isinstance(o, torch.Tensor) else (o.logits if hasattr(o, "logits") and o.logits is not None
                                                  else o.last_hidden_state)


def _case(name):
    build, kind, proj = MODELS[name]
    return name, build(), _inputs(kind), proj


@pytest.fixture(params=list(MODELS))
def case(request):
    return _case(request.param)


@pytest.fixture(params=[m for m in MODELS if m != "timm-eva"])  # EVA blocks expose residual points only
def attn_case(request):
    return _case(request.param)


def _reference_resid_post(name, model, args, kwargs):
    if name.startswith("timm"):
        inter = model.forward_intermediates(*args, return_prefix_tokens=True, norm=False, output_fmt="NLC",
                                            intermediates_only=True)
        return [torch.cat([prefix, spatial], 1) for spatial, prefix in inter]
    return list(model(**kwargs, output_hidden_states=True).hidden_states[1:])


@torch.no_grad()
def test_parity_with_the_plain_model(case):
    name, model, (args, kwargs), _ = case
    ref = _out(model(*args, **kwargs))
    hv = HookedVision(model)
    assert torch.equal(_out(hv.run_with_hooks(*args, **kwargs)), ref)              # hooks off: the model itself
    out, cache = hv.run_with_cache(*args, **kwargs, names_filter=lambda n: "resid" in n or n == "hook_embed")
    assert torch.equal(_out(out), ref)              # residual hooks only record: the same computation, bit-exact
    want = _reference_resid_post(name, model, args, kwargs)
    last = len(want) - (1 if name == "hf-llama" else 0)  # Llama's last hidden state is after the final norm
    for layer in range(last):  # the same blocks on the same values; 1e-6 only spares O(1) values an ulp or two
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], want[layer], atol=1e-6, rtol=0)
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])      # the same tensor, two names
    for layer in range(hv.n_layers - 1):
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"], cache[f"blocks.{layer + 1}.hook_resid_pre"])


@torch.no_grad()
def test_zeroing_attn_out_equals_zeroing_the_output_projection(case):
    name, model, (args, kwargs), proj = case
    hv = HookedVision(model)
    hooked = _out(hv.run_with_hooks(*args, **kwargs, fwd_hooks=[("blocks.1.hook_attn_out", lambda a, hook: a * 0)]))
    lin = hv.blocks[1].get_submodule(proj)
    lin.weight.zero_()
    if lin.bias is not None:
        lin.bias.zero_()
    # both branches are exactly 0 (a * 0, x @ 0 + 0) and everything else is the same computation: bit-exact
    assert torch.equal(hooked, _out(model(*args, **kwargs)))


@torch.no_grad()
def test_attention_internals_are_consistent_and_patchable(attn_case):
    name, model, (args, kwargs), proj = attn_case
    hv = HookedVision(model)
    ref = _out(model(*args, **kwargs))
    out, c = hv.run_with_cache(*args, **kwargs, names_filter=lambda n: n.startswith("blocks.0.attn."))
    torch.testing.assert_close(_out(out), ref, atol=TINY_FP32_ATOL, rtol=0)        # the unfused path, same math
    q, k, pattern = c["blocks.0.attn.hook_q"], c["blocks.0.attn.hook_k"], c["blocks.0.attn.hook_pattern"]
    B, N, H, d = q.shape
    # softmax rows sum to 1 within ~gamma(N <= 17) = 1e-6 in float32
    assert pattern.shape == (B, H, N, N) and torch.allclose(pattern.sum(-1), torch.ones(B, H, N), atol=1e-5)
    # one op each from the cached q, k, v: scores are dots of length d = 8 of O(1) terms (error ~ gamma(8) x 8
    # ~ 4e-6 before a softmax whose slope is <= 1), z sums N <= 17 products of values in [0, 1] x O(1): 1e-5
    if name not in ("hf-bert", "hf-llama"):  # no mask: the pattern is softmax(q k^T / sqrt(d))
        torch.testing.assert_close(pattern, (q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * d ** -0.5).softmax(-1),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["blocks.0.attn.hook_z"], (pattern @ c["blocks.0.attn.hook_v"].transpose(1, 2))
                               .transpose(1, 2), atol=1e-5, rtol=1e-5) if name != "hf-llama" else None

    def kill_head(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    hooked = _out(hv.run_with_hooks(*args, **kwargs, fwd_hooks=[("blocks.1.attn.hook_z", kill_head)]))
    assert torch.equal(_out(model(*args, **kwargs)), ref)                          # switched back afterwards
    lin = hv.blocks[1].get_submodule(proj)
    lin.weight[:, 2 * d:3 * d] = 0
    # the unfused path with head 2 zeroed vs the fused model with head 2's output columns zeroed: exact-arithmetic
    # equal; a head not killed (or the wrong one) moves the output by ~1e-1
    torch.testing.assert_close(hooked, _out(model(*args, **kwargs)), atol=TINY_FP32_ATOL, rtol=0)


@torch.no_grad()
def test_patching_resid_mid_feeds_the_mlp():
    model = _timm("vit_tiny_patch16_224")
    hv = HookedVision(model)
    x = _inputs("image")[0]
    _, c = hv.run_with_cache(*x, names_filter=["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid"])
    mid = c["blocks.0.hook_resid_mid"] * 2
    with hv.hooks([("blocks.0.hook_resid_mid", lambda a, hook: mid)]):
        _, p = hv.run_with_cache(*x, names_filter=["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"])
    blk = hv.blocks[0]
    # the patch enters as the attention branch's output, mid - pre (|.| <= 2 s), which the block adds back to pre:
    # two float32 roundings, U32 x 2 s + U32 x s, with s = max(|pre|, |mid|)
    scale = float(torch.maximum(mid.abs().max(), c["blocks.0.hook_resid_pre"].abs().max()))
    torch.testing.assert_close(p["blocks.0.hook_resid_mid"], mid, atol=3 * U32 * scale, rtol=0)
    # the block's own MLP on the same values (the same computation): 1e-5 only spares an ulp of O(1) values
    torch.testing.assert_close(p["blocks.0.hook_resid_post"], mid + blk.ls2(blk.mlp(blk.norm2(mid))), atol=1e-5, rtol=0)


@torch.no_grad()
def test_stop_at_layer_and_cleanup_on_error():
    model = tiny_causal_lm()
    hv = HookedVision(model)
    ids = _inputs("ids")[1]["input_ids"]
    out, cache = hv.run_with_cache(ids, stop_at_layer=1)
    assert torch.equal(out, cache["blocks.0.hook_resid_post"])                # the very tensor returned
    assert not any(k.startswith("blocks.1.") for k in cache) and "hook_final" not in cache
    # layer 0 of the same model on the same ids: the same computation; 1e-6 only spares an ulp of O(1) values
    torch.testing.assert_close(out, model(ids, output_hidden_states=True).hidden_states[1], atol=1e-6, rtol=0)
    impl = model.config._attn_implementation
    n_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = n_hooks()  # (transformers keeps its own output-recording hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with hv.hooks([("blocks.0.attn.hook_pattern", lambda a, hook: None)]):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == impl
    assert n_hooks() == before


def test_bad_names_and_models():
    hv = HookedVision(tiny_causal_lm())
    with pytest.raises(HookError, match="did you mean blocks.1.hook_resid_post"):
        hv.run_with_cache(torch.zeros(1, 4, dtype=torch.long), names_filter="blocks.1.hook_resid_pots")
    with pytest.raises(HookError, match="stop_at_layer=9"):
        hv.run_with_cache(torch.zeros(1, 4, dtype=torch.long), stop_at_layer=9)
    with pytest.raises(HookError, match="not a supported model.*timm EVA.*Llama-like"):
        HookedVision(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_eva_offers_residual_points_only():
    hv = HookedVision(_case("timm-eva")[1])
    assert hv.family.kind == "none" and "blocks.0.hook_resid_mid" in hv.hook_names
    with pytest.raises(HookError, match="did you mean"):
        hv.check_name("blocks.0.attn.hook_pattern")
