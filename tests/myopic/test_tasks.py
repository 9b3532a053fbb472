"""The synthetic pre-caching task and the myopia-gap command (tiny models, a few steps)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from conversion.cli import main
from hf_ext.myopic import count_myopic_calls
from hf_ext.myopic.synthetic import SyntheticConfig, SyntheticRegressor, ridge_r2, sample, train, trivial_loss
from hf_ext.zoo import resolve_model


def test_synthetic_data_follows_the_formula():
    cfg = SyntheticConfig(p=0.5)
    x, z, y = sample(cfg, 3, torch.Generator().manual_seed(0))
    n = 20
    want = z[1, n] * sum(math.sin(10 * x[1, n - i]) for i in range(1, 11)) + (1 - z[1, n]) * x[1, n]
    assert abs(float(y[1, n]) - float(want)) < 1e-4
    first = z[0, 2] * (math.sin(10 * x[0, 1]) + math.sin(10 * x[0, 0])) + (1 - z[0, 2]) * x[0, 2]
    assert abs(float(y[0, 2]) - float(first)) < 1e-5                      # lags before the start are 0
    # the official code's trivial (predict 0 on p = 1 data) is 1.257
    assert abs(trivial_loss(SyntheticConfig(p=1.0, eval_sequences=4096)) - 1.257) < 0.02


def test_frequency_curriculum_ramps_to_the_task_and_evaluation_stays_there():
    cfg = SyntheticConfig(steps=100, curriculum=0.3)
    assert cfg.train_freq(0) == 1 and cfg.train_freq(15) == 5.5 and cfg.train_freq(30) == cfg.train_freq(99) == 10
    assert SyntheticConfig(steps=100, curriculum=0).train_freq(0) == 10                  # the paper: no ramp
    x, z, y = sample(SyntheticConfig(p=1.0), 2, torch.Generator().manual_seed(0), freq=3.0)
    assert abs(float(y[0, 12]) - sum(math.sin(3 * float(x[0, 12 - i])) for i in range(1, 11))) < 1e-4
    with pytest.raises(ValueError, match="curriculum"):
        SyntheticConfig(curriculum=1.5)


def test_ridge_probe_r2():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4000, 16, generator=g)
    t = h @ torch.randn(16, generator=g)
    assert ridge_r2(h[:2000], t[:2000], h[2000:], t[2000:]) > 0.999
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
    d = tmp_path_factory.mktemp("tiny_lm")
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_gap_cli_reports_and_saves_a_plain_model(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "myopic"
    rc = main(["myopic", "gap", "--model", str(tiny_lm_dir), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
               "--eval-tokens", "256", "--out", str(out), "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["gap_nats"] == pytest.approx(r["nll_myopic"] - r["nll_vanilla"])
    assert r["nll_vanilla"] != r["nll_myopic"]                          # the two trainings differ
    model = AutoModelForCausalLM.from_pretrained(out)                    # plain transformers, no hf-ext needed
    assert model.config.model_type == "llama"
    assert "myopia gap" in (out / "README.md").read_text()


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
