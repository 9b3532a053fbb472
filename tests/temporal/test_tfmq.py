"""TFMQ quantization: ops against naive references, finite-set ranges, the cache-based temporal path,
save/load, torchao's real int8 path, the CLI, and bad input."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from test_temporal_cache import dit, sample

from hf_ext.temporal import TemporalError, find_tib
from hf_ext.temporal.io import apply_saved_tfmq, save_tfmq
from hf_ext.temporal.ops import (act_qparams, fake_quant_act, fake_quant_act_naive, fake_quant_weight,
                                 fake_quant_weight_naive)
from hf_ext.temporal.quant import QUANT_HOOK, TFMQConfig, quantize_tfmq, quantize_torchao, remove_tfmq


def test_ops_match_naive_references():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 10, generator=g), 3 * torch.randn(4, 7, generator=g)
    for bits in (4, 8):
        deq, q, scale = fake_quant_weight(w, bits)
        torch.testing.assert_close(deq, fake_quant_weight_naive(w, bits), atol=1e-6, rtol=0)
        assert -(2 ** (bits - 1)) <= int(q.min()) and int(q.max()) <= 2 ** (bits - 1) - 1 and scale.shape == (6, 1)
    scale, zero = act_qparams(x.min(), x.max())
    got = fake_quant_act(x, scale, zero)
    torch.testing.assert_close(got, fake_quant_act_naive(x, x.min().item(), x.max().item()), atol=1e-6, rtol=0)
    assert (got - x).abs().max() <= scale / 2 + 1e-6                     # within half a step of the grid


def _setup(config, steps=6):
    model, inputs, shape = dit()
    model.eval()
    sched = DDIMScheduler(num_train_timesteps=1000)
    run = lambda: sample(model, inputs, shape, sched, steps)  # noqa: E731
    return model, sched, run, quantize_tfmq(model, config, sched, steps, run=run)


def test_finite_set_ranges_and_cache_based_temporal_path():
    model, sched, run, state = _setup(TFMQConfig(weight_bits=4))
    tib = find_tib(model)
    assert state["cached"] == tib.modules
    r = state["ranges"]["transformer_blocks.0.attn1.to_q"]
    assert r.shape == (6, 2) and bool((r[:, 0] <= r[:, 1]).all()) and len(set(r[:, 1].tolist())) > 1   # per step
    hooked = {n for n, m in model.named_modules()
              if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(QUANT_HOOK)}
    assert hooked == set(state["ranges"]) and not any(n.startswith(tuple(tib.modules)) for n in hooked)
    _, inputs, shape = dit()
    with pytest.raises(TemporalError, match="not in the temporal cache|not one of this quantization's"):
        sample(model, inputs, shape, sched, 8)                    # a schedule it was not calibrated for
    remove_tfmq(model)
    assert not any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(QUANT_HOOK)
                   for m in model.modules())


@torch.no_grad()
def test_minmax_is_one_range_and_w4_is_worse_than_w8():
    model, inputs, shape = dit()
    model.eval()
    sched = DDIMScheduler(num_train_timesteps=1000)
    ref = sample(model, inputs, shape, sched)
    err = {}
    for bits in (8, 4):
        st = quantize_tfmq(model, TFMQConfig(weight_bits=bits, calibration="minmax", temporal="quantize"), sched, 6,
                           run=lambda: sample(model, inputs, shape, sched))
        assert all(r.shape == (1, 2) for r in st["ranges"].values()) and not st["cached"]
        err[bits] = float((sample(model, inputs, shape, sched) - ref).norm() / ref.norm())
        remove_tfmq(model)
    assert 0 < err[8] < err[4], err


@torch.no_grad()
def test_save_and_load_give_the_same_samples(tmp_path):
    model, sched, run, _ = _setup(TFMQConfig(weight_bits=4, temporal="auto", max_disturbance=0.0))
    want = run()
    save_tfmq(tmp_path, model)
    fresh, _, _ = dit()
    fresh.eval()
    cfg = apply_saved_tfmq(fresh, tmp_path)
    assert cfg.weight_bits == 4 and fresh._hf_ext_tfmq["cached"] == model._hf_ext_tfmq["cached"]
    _, inputs, shape = dit()
    # bit for bit on every machine: the saved codes and scales are the computed ones, and dequantizing them
    # is elementwise into fresh (aligned) tensors, so the same kernels run on the same values
    assert torch.equal(sample(fresh, inputs, shape, sched), want)
    other = torch.nn.Module()
    with pytest.raises(TemporalError, match="does not fit this model"):
        apply_saved_tfmq(other, tmp_path)
    with pytest.raises(TemporalError, match="no tfmq_quant.safetensors"):
        apply_saved_tfmq(fresh, tmp_path / "none")


def test_bad_input():
    with pytest.raises(TemporalError, match="weight_bits=3 is not supported"):
        TFMQConfig(weight_bits=3)
    with pytest.raises(TemporalError, match="act_bits=4 is not supported"):
        TFMQConfig(act_bits=4)
    with pytest.raises(TemporalError, match="no x86 CPU kernel for W4A8"):
        quantize_torchao(dit()[0], weight_bits=4)
    with pytest.raises(TemporalError, match="no TFMQ quantization to save"):
        save_tfmq("unused", dit()[0])


@torch.no_grad()
def test_torchao_int8_runs_real_kernels_close_to_fp32():
    model, inputs, shape = dit()
    model.eval()
    x, t = torch.randn(shape, generator=torch.Generator().manual_seed(3)), torch.tensor(500)
    ref = model(**inputs(x, t)).sample
    what = quantize_torchao(model)
    assert "Int8DynamicActivationInt8Weight" in what
    assert type(model.transformer_blocks[0].attn1.to_q.weight).__name__ == "Int8Tensor"
    got = model(**inputs(x, t)).sample
    assert float((got - ref).norm() / ref.norm()) < 0.05


def test_cli_convert_tfmq(tmp_path, capsys):
    import json

    from conversion.cli import main
    from hf_ext.temporal.io import load_tfmq_model

    model, _, _ = dit()
    model.save_pretrained(tmp_path / "dit")
    out = tmp_path / "q"
    assert main(["convert", "tfmq", "--model", str(tmp_path / "dit"), "--weights", "int4", "--steps", "4",
                 "--calib-samples", "2", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["cached_temporal_modules"] == 5 and r["quantized_layers"] > 0 and r["simulated"] is True
    assert {"tfmq_quant.safetensors", "temporal_cache.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    loaded, cfg = load_tfmq_model(out)
    assert cfg.weight_bits == 4 and loaded._hf_ext_tfmq is not None
    assert main(["convert", "tfmq", "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "holds no diffusers transformer" in capsys.readouterr().err and not (tmp_path / "x").exists()
