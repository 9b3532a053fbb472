"""Read-ME on the real SmolLM2-135M: full masks reproduce the dense logits; half masks keep half the MLP."""
from __future__ import annotations

import pytest
import torch
from numerics import ROUND_TRIP_RTOL64, assert_close_rel

from hf_ext.moe import activation_stats, expert_masks
from hf_ext.moe.experts import moefy, set_experts

pytestmark = pytest.mark.real


@torch.no_grad()
def test_smollm2_experts_from_domain_labels():
    from hf_ext.tasks import load_task
    from hf_ext.zoo import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m")
    task = load_task("docs-sections", "train", max_per_class=2)                 # 2 paragraphs of each section
    batches, labels = [], []
    for c in range(4):                                                           # 4 domains: 4 sections
        texts = [t for t, y in zip(task.texts, task.labels) if y == c]
        batches.append(dict(tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)))
        labels.append(torch.full((len(texts),), c))
    probe = dict(tok(["The import statement combines two operations."], return_tensors="pt"))
    stats = activation_stats(model, batches, clusters=4, labels=labels)
    assert stats.tokens.min() > 0 and stats.abs_sum.shape == (30, 4, 1536)
    half = expert_masks(stats, top_p=0.5)
    assert half.active_fraction == 0.5 and all(r.shape == (4, 768 - len(s)) for s, r in zip(half.shared, half.routed))
    model.double()     # float64, so that the comparison below is tight on every machine
    dense = model(**probe).logits
    mlps = moefy(model, expert_masks(stats, top_p=1.0))
    set_experts(mlps, torch.zeros_like(probe["input_ids"]))
    # lossless in exact arithmetic: each MLP's 1536 products are summed in another order (shared, then routed);
    # in float64 that moves the logits by ~n U64 per sum, within ROUND_TRIP_RTOL64 of their scale after 30
    # layers (tests/numerics.py); one neuron dropped per layer moves them by 2.7e-2 of their scale (measured)
    assert_close_rel(model(**probe).logits, dense, ROUND_TRIP_RTOL64)


def test_cli_convert_moe_on_smollm2(tmp_path, capsys):
    import json

    from conversion.cli import main

    out = tmp_path / "moe"
    assert main(["convert", "moe", "--model", "smollm2-135m", "--experts", "4", "--top-p", "0.5",
                 "--calib-tokens", "1024", "--train-tokens", "4096", "--router-epochs", "4", "--tune-tokens", "16384",
                 "--tune-rounds", "1", "--max-tokens", "512", "--window", "256", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["active_mlp_fraction"] == 0.5 and r["experts"] == 4 and r["ppl_source"] > 1 and r["tune_tokens"] == 16384
    # Half of every MLP, one round: the router on 4096 tokens, then 16 steps of expert tuning (warmup 16). Measured
    # here: ppl_converted / ppl_source 2.58 (source 21.9 on these 512 tokens) and the tuning KL 1.72 -> 1.19
    # (last 10 steps / first: 0.69). With --tune-lr 0 (tuning broken): 5.09 and 1.07. The bounds sit between.
    assert 1 < r["ppl_converted"] / r["ppl_source"] < 3.6, r
    assert r["tune_final_kl"] < 0.86 * r["tune_first_kl"], r
    # the router's target accuracy on its training tokens: measured 0.73 (4 epochs); an untrained
    # one scores about 1 / D (0.11 at D = 8 in benchmarks/moe_tune.py's first router round)
    assert r["router_target_accuracy"] > 0.5, r
    assert not (tmp_path / "moe.tune").exists()                    # the tuning state is removed once saved
    assert {"config.json", "model.safetensors", "modeling_pregated_moe.py", "README.md"} <= {p.name for p in out.iterdir()}
    assert main(["convert", "moe", "--top-p", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "--top-p 1.5 must lie in (0, 1]" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_convert_moe_short_text_is_a_clear_error(tmp_path, capsys):
    from conversion.cli import main
    from hf_ext.zoo import load_corpus

    text = tmp_path / "calib.txt"
    text.write_text(load_corpus("python-docs:train")[:8000])          # ~2k tokens, below --calib-tokens 16384
    out = tmp_path / "moe"
    assert main(["convert", "moe", "--calib-text", str(text), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--calib-tokens (16384)" in err and "lower --calib-tokens" in err, err
    assert not out.exists() and not (tmp_path / "moe.tune").exists()
