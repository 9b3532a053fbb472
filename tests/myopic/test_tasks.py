"""The synthetic pre-caching task and the myopia-gap command (tiny models, a few steps)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from conversion.cli import main
from hf_ext.myopic import count_myopic_calls
from hf_ext.myopic.synthetic import (SyntheticConfig, SyntheticRegressor, loss_curve, ridge_r2, run_synthetic, sample,
                                     train, trivial_loss)
from hf_ext.eval import tokenize
from hf_ext.zoo import load_corpus, resolve_model
from numerics import TINY_FP32_ATOL


def test_synthetic_data_follows_the_formula():
    cfg = SyntheticConfig(p=0.5)
    x, z, y = sample(cfg, 3, torch.Generator().manual_seed(0))
    n = 20
    want = z[1, n] * sum(math.sin(10 * x[1, n - i]) for i in range(1, 11)) + (1 - z[1, n]) * x[1, n]
    # float32 sum of 10 sines of float32 arguments (|.| <= 1 each; sin(10 x) loses ~10 ulps of x): within
    # ~100 U32 * 10 = 6e-5 of the float64 formula; 1e-4 holds. Two terms: 1e-5.
    assert abs(float(y[1, n]) - float(want)) < 1e-4
    first = z[0, 2] * (math.sin(10 * x[0, 1]) + math.sin(10 * x[0, 0])) + (1 - z[0, 2]) * x[0, 2]
    assert abs(float(y[0, 2]) - float(first)) < 1e-5                      # lags before the start are 0
    # the official code's trivial (predict 0 on p = 1 data) is 1.257; a Monte Carlo mean over 4096 sequences
    # of 64 has a standard error below 0.005, so 0.02 is 4 standard errors
    assert abs(trivial_loss(SyntheticConfig(p=1.0, eval_sequences=4096)) - 1.257) < 0.02


def test_frequency_curriculum_ramps_to_the_task_and_evaluation_stays_there():
    cfg = SyntheticConfig(steps=100, curriculum=0.3)
    assert cfg.train_freq(0) == 1 and cfg.train_freq(15) == 5.5 and cfg.train_freq(30) == cfg.train_freq(99) == 10
    assert SyntheticConfig(steps=100, curriculum=0).train_freq(0) == 10                  # the paper: no ramp
    x, z, y = sample(SyntheticConfig(p=1.0), 2, torch.Generator().manual_seed(0), freq=3.0)
    assert abs(float(y[0, 12]) - sum(math.sin(3 * float(x[0, 12 - i])) for i in range(1, 11))) < 1e-4   # as above
    with pytest.raises(ValueError, match="curriculum"):
        SyntheticConfig(curriculum=1.5)


def test_ridge_probe_r2():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4000, 16, generator=g)
    t = h @ torch.randn(16, generator=g)
    # an exactly linear target: R^2 = 1 minus the ridge shrinkage (~lambda / 2000 per direction) > 0.999
    assert ridge_r2(h[:2000], t[:2000], h[2000:], t[2000:]) > 0.999
    # noise: held-out R^2 is ~ -16/2000 +- 0.03 (16 fitted directions), far below 0.05... and a broken probe
    # fitting the test targets would give ~1
    assert ridge_r2(h[:2000], torch.randn(2000, generator=g), h[2000:], torch.randn(2000, generator=g)) < 0.05


def test_synthetic_training_runs_myopically():
    cfg = SyntheticConfig(steps=3, batch_size=8, d_model=32, seq_len=16, eval_sequences=16, probe_sequences=16)
    model, _ = train(cfg, myopic=True, progress=False)
    assert isinstance(model, SyntheticRegressor) and model.trunk.config._attn_implementation == "myopic"
    count_myopic_calls(model)
    model(*sample(cfg, 2, torch.Generator().manual_seed(0))[:2])
    assert count_myopic_calls(model) == cfg.n_layer
    with pytest.raises(ValueError, match="probability"):
        SyntheticConfig(p=0)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer (an offline asset: the tests using it are `real`)."""
    d = tmp_path_factory.mktemp("tiny_lm")
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.real
def test_gap_cli_reports_and_saves_a_plain_model(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "myopic"
    rc = main(["myopic", "gap", "--model", str(tiny_lm_dir), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
               "--lr", "3e-3",  # large, so 2 steps move vanilla and myopic apart by more than the NLL tolerance
               "--eval-tokens", "256", "--out", str(out), "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["nll_vanilla"] != r["nll_myopic"]                          # the two trainings differ
    model = AutoModelForCausalLM.from_pretrained(out)                    # plain transformers, no hf-ext needed
    assert model.config.model_type == "llama"
    # the saved model is the myopic one that was measured: its held-out NLL, computed here independently
    # (mean next-token cross-entropy over the first 256 eval tokens, one window), equals the report's. The
    # sides differ in attention kernels (myopic vs sdpa), so logits agree to TINY_FP32_ATOL and the mean
    # log-softmax to twice that (log-softmax moves at most 2x the max logit change)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tokenize(tok, load_corpus("python-docs:eval"), 256)[None]
    with torch.no_grad():
        nll = float(torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]))
    assert abs(nll - r["nll_myopic"]) <= 2 * TINY_FP32_ATOL
    assert abs(nll - r["nll_vanilla"]) > 2 * TINY_FP32_ATOL              # and it tells the two models apart
    assert "myopia gap" in (out / "README.md").read_text()


@pytest.mark.real
def test_gap_cli_bad_input(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["myopic", "gap", "--model", str(tiny_lm_dir), "--eval-text", "python-docs:train",
                 "--out", str(out)]) == 2
    assert "never saw" in capsys.readouterr().err and not out.exists()
    assert main(["myopic", "gap", "--model", str(tiny_lm_dir), "--local-window", "0", "--out", str(out)]) == 2
    assert "local-window" in capsys.readouterr().err and not out.exists()


def test_synthetic_cli_reports_both_models_and_refuses_a_bad_curriculum(capsys):
    assert main(["myopic", "synthetic", "--steps", "2", "--batch-size", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["steps"] == 2 and r["curriculum"] == SyntheticConfig().curriculum
    assert {"vanilla_normalized_loss", "myopic_normalized_loss", "vanilla_probe_r2_layer2"} <= set(r)
    assert main(["myopic", "synthetic", "--curriculum", "1.5"]) == 2
    assert "curriculum=1.5" in capsys.readouterr().err


def test_synthetic_cli_trains_only_the_models_asked_for(capsys):
    assert main(["myopic", "synthetic", "--steps", "2", "--batch-size", "4", "--seed", "3", "--models", "vanilla",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["seed"] == 3 and "vanilla_normalized_loss" in r and not any(k.startswith("myopic_") for k in r)
    assert len(r["vanilla_train_loss_curve"]) == 1               # one point per 1000 steps, started at step 0
    with pytest.raises(SystemExit):                                  # argparse's usage error
        main(["myopic", "synthetic", "--models", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="choose one or more"):
        run_synthetic(SyntheticConfig(steps=1), models=())


def test_synthetic_loss_curve_averages_each_window_of_steps():
    # 2100 steps logged every 50th: 42 losses, 20 per 1000-step window; the last window holds 2 (steps 2000, 2050)
    losses = [float(i) for i in range(42)]
    assert loss_curve(losses, 50) == [9.5, 29.5, 40.5]
    assert loss_curve([1.0, 3.0], 50, every=10) == [1.0, 3.0]          # a window shorter than the log step
