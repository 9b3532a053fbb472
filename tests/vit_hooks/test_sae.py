"""SAEs: the three architectures learn a known sparse dictionary, the geometric median, resampling, the
SAELens layout round trip, training from an hf-ext store, and clear errors. Tiny dims; seconds each."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import assert_round_trip
from safetensors.torch import load_file, save_file

from hf_ext.data import DataFormatError, ShardedDataset, write_rows
from hf_ext.errors import HfExtError, OutputExistsError
from hf_ext.vit_hooks.sae import (SAEConfig, SAEError, SAETrainConfig, SparseAutoencoder, evaluate_sae,
                                  geometric_median, geometric_median_naive, resample_dead_latents, split_indices,
                                  train_sae)

ROOT = Path(__file__).resolve().parents[2]
D_IN, ATOMS, ACTIVE, ROWS = 32, 64, 3, 8192
FAST = dict(batch_size=256, lr=3e-3, resample_every=0, dead_window=50)


def sparse_rows(n=ROWS, seed=0) -> torch.Tensor:
    """Rows = sparse nonnegative codes (3 of 64 atoms, weights in [0.5, 1.5]) @ a random unit dictionary + 0.5."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(ATOMS, D_IN, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)                                   # (64, 32)
    on = torch.rand(n, ATOMS, generator=g).argsort(1)[:, :ACTIVE]              # (n, 3)
    codes = torch.zeros(n, ATOMS).scatter(1, on, torch.rand(n, ACTIVE, generator=g) + 0.5)
    return codes @ atoms + 0.5                                                  # (n, 32)


@torch.no_grad()
def metrics_by_hand(sae, x: torch.Tensor) -> dict:
    """evaluate_sae's figures from their definitions, independently: EV = 1 - ||x - x_hat||^2 / ||x - mean(x)||^2
    summed over all rows and dims (the variance centred on the rows' mean), L0 = mean nonzero latents per row,
    dead = share of latents that never fire, MSE per element. The SAE's float32 outputs, summed in float64."""
    f = sae.encode(x)                                                           # (N, d_sae)
    x_hat = sae.decode(f).double()
    xd = x.double()
    sse = float(((x_hat - xd) ** 2).sum())
    sst = float(((xd - xd.mean(0)) ** 2).sum())
    return {"explained_variance": 1 - sse / sst, "l0": (f != 0).sum().item() / len(x),
            "dead_fraction": (~(f != 0).any(0)).sum().item() / f.shape[1], "mse": sse / x.numel()}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is many times faster than two fighting over a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("acts") / "store"
    write_rows([sparse_rows().numpy()], root, dtype="float32", name="activations",
               provenance={"model": "toy-vit", "hook_name": "blocks.1.hook_resid_post", "cls_only": True})
    return root


# Seeds 0-4 (SAETrainConfig.seed) measured EV 0.925-0.932 / L0 11.0-20.4 (standard), 0.916-0.930 / 4 (topk),
# 0.905-0.921 / 3.3-7.7 (jumprelu). Without the sparsity penalty (l1 or l0 coefficient 0) L0 is 74-75 at EV 0.997,
# so the L0 bounds are what catches a penalty that does nothing; EV > 0.88 sits ~4 spreads below the lowest seed.
@pytest.mark.parametrize("arch,kw,max_l0", [("standard", dict(l1_coefficient=0.3), 30), ("topk", dict(k=4), 4),
                                            ("jumprelu", dict(l0_coefficient=0.1), 12)])
def test_each_architecture_learns_the_sparse_dictionary(store, arch, kw, max_l0):
    sae, log = train_sae(store, SAEConfig(D_IN, 128, arch, **kw), SAETrainConfig(total_rows=256 * 400, **FAST),
                         progress=False)
    ev = log["eval"]
    assert ev["explained_variance"] > 0.88 and ev["l0"] <= max_l0, ev          # measured spread: see above
    assert log["steps"] == 400 and log["rows"] == 400 * 256
    held = ShardedDataset(store).__getitems__(np.arange(0, ROWS, 20))["activations"]  # (410, 32)
    want = metrics_by_hand(sae, held)
    got = evaluate_sae(sae, held)     # one chunk of these very rows: its encode/decode are want's, bit for bit
    # integer counts over 410 rows and 128 latents: the same bits whatever the float summation
    assert got["rows"] == 410 and got["l0"] == want["l0"] and got["dead_fraction"] == want["dead_fraction"]
    # the same float32 reconstructions on both sides; only the float64 sums differ in order, by ~1e-15 relative
    assert abs(got["explained_variance"] - want["explained_variance"]) < 1e-9, (got, want)
    assert abs(got["mse"] - want["mse"]) < 1e-9 * want["mse"], (got, want)
    # train_sae's final eval read the held-out rows from the store in chunks of 256, so its float32 GEMMs had
    # other shapes: reconstructions move by <= 2 gamma(128) ~ 1.5e-5 of their scale (EV by < 1e-4), and a
    # pre-activation within rounding of 0 / the threshold may flip a latent (1/410 of L0 each). Reading other
    # records than the held-out ones moves EV by ~1e-2 and L0 by ~0.1 (measured: an off-by-one record read).
    assert ev["rows"] == 410 and abs(ev["explained_variance"] - want["explained_variance"]) < 1e-3, (ev, want)
    assert abs(ev["l0"] - want["l0"]) <= 3 / 410, (ev, want)
    if arch == "topk":  # at most k latents per row, exactly (ReLU after top-k can only lower it)
        assert int((sae.encode(held) != 0).sum(-1).max()) <= 4
    # decoder rows were unit norm in the scaled space; folding the input scale divides them by it: one float32
    # division and a norm over 32 elements, so within ~gamma(34) = 2e-6 relative; 1e-4 has room
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 1 / log["activation_scale"]), rtol=1e-4, atol=0)


def test_standard_l0_falls_as_l1_coefficient_rises(store):
    l0 = [train_sae(store, SAEConfig(D_IN, 128, l1_coefficient=c), SAETrainConfig(total_rows=256 * 200, **FAST),
                    progress=False)[1]["eval"]["l0"] for c in (0.1, 1.0)]
    assert l0[1] < 0.4 * l0[0], l0  # measured 0.22-0.25 over seeds 0-3; an ignored coefficient gives ~1


def test_topk_l0_is_at_most_k_untrained():
    sae = SparseAutoencoder(SAEConfig(D_IN, 128, "topk", k=5))
    f = sae.encode(torch.randn(300, D_IN))
    assert int((f != 0).sum(-1).max()) <= 5 and int((f != 0).sum(-1).max()) > 0


def test_jumprelu_threshold_gradient_is_the_rectangle_pseudo_derivative():
    sae = SparseAutoencoder(SAEConfig(2, 2, "jumprelu", jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.5))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
    z = torch.tensor([[0.52, 0.9], [0.49, 0.2]])  # latent 0: both within eps/2 of theta; latent 1: neither
    sae.activate(sae.pre_acts(z)).sum().backward()
    # d/dtheta sum JumpReLU = sum over rows of -(theta/eps) K((z - theta)/eps) = -(0.5/0.05) * 2 = -20
    # -20 from one float32 division and a sum of two terms: a few ulps of 20, inside allclose's rtol 1e-5
    assert torch.allclose(sae.threshold.grad, torch.tensor([-20.0, 0.0]))
    # the identity encoder multiplies by 1 and 0 and adds zeros: z passes through exactly
    assert torch.equal(sae.activate(sae.pre_acts(z)), torch.tensor([[0.52, 0.9], [0.0, 0.0]]))


def test_geometric_median_matches_naive_and_ignores_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    fast, slow = geometric_median(x), geometric_median_naive(x)
    # two iterative optimisers of the same strictly convex cost, each stopped by its own tolerance (Weiszfeld:
    # steps <= 1e-9, L-BFGS: gradient <= 1e-12): measured 2e-8 apart; 1e-5 is convergence slack, float64
    # roundoff is ~1e-14, and the mean (what a broken iteration returns) is 5e-2 away on these rows
    assert torch.allclose(fast, slow, atol=1e-5, rtol=0)
    cost = lambda y: float((x - y).norm(dim=1).sum())  # noqa: E731
    # the cost (~124, 60 float64 norms) rounds at ~1e-12; Weiszfeld is at least as good as L-BFGS, and the
    # median beats the mean by far more than 1e-3 (measured 0.11)
    assert cost(fast) <= cost(slow) + 1e-9 and cost(fast) < cost(x.mean(0)) - 1e-3
    centre = torch.full((5,), 3.0, dtype=torch.float64)
    dirty = torch.cat([centre + 0.1 * torch.randn(95, 5, generator=g, dtype=torch.float64),
                       centre + 1000.0 * torch.ones(5, 5, dtype=torch.float64)])
    assert (geometric_median(dirty) - centre).norm() < 0.2 < 40 < (dirty.mean(0) - centre).norm()


def test_resampling_revives_dead_latents_and_resets_their_adam_state():
    torch.manual_seed(0)
    x = sparse_rows(2048)
    sae = SparseAutoencoder(SAEConfig(D_IN, 64))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.forward_with_loss(x[:256])["loss"].backward()
    opt.step()
    with torch.no_grad():
        sae.b_enc[:32] = -100.0  # latents 0..31 can never fire
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:32] = True
    assert evaluate_sae(sae, x)["dead_fraction"] >= 0.5
    live_enc = sae.W_enc[:, 32:].clone()
    assert resample_dead_latents(sae, dead, x, opt, torch.Generator().manual_seed(0)) == 32
    assert evaluate_sae(sae, x)["dead_fraction"] < 0.1
    assert torch.equal(sae.W_enc[:, 32:], live_enc)  # live latents untouched
    # unit directions normalised in float32: the norm is 1 within ~gamma(32) = 2e-6, inside allclose's 1e-5
    assert torch.allclose(sae.W_dec[:32].norm(dim=1), torch.ones(32))
    st = opt.state[sae.W_enc]  # zeroed moments are exactly 0; trained ones are not
    assert st["exp_avg"][:, :32].abs().sum() == 0 and st["exp_avg_sq"][:, :32].abs().sum() == 0
    assert st["exp_avg"][:, 32:].abs().sum() > 0


def test_train_sae_resamples_forced_dead_latents(store):
    def run(resample_every):
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(D_IN, 64, l1_coefficient=0.3))
        with torch.no_grad():
            sae.b_enc[:32] = -100.0  # half the latents start dead; no gradient can revive them
        tc = SAETrainConfig(total_rows=256 * 150, **{**FAST, "resample_every": resample_every, "dead_window": 20})
        return train_sae(store, None, tc, progress=False, sae=sae)[1]

    off, on = run(0), run(50)
    assert off["resampled"] == 0 and off["eval"]["dead_fraction"] >= 0.5
    assert on["resampled"] == 32 and on["eval"]["dead_fraction"] < 0.1
    # measured gains 0.074-0.085 (seeds 0-3); without resampling, none
    assert on["eval"]["explained_variance"] > off["eval"]["explained_variance"] + 0.05


@pytest.mark.parametrize("arch,dtype", [("standard", "float32"), ("topk", "float32"), ("jumprelu", "float32"),
                                        ("jumprelu", "bfloat16")])
def test_save_load_round_trip_in_saelens_layout(tmp_path, arch, dtype):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(D_IN, 96, arch, k=7 if arch == "topk" else 32, dtype=dtype,
                                      hook_name="blocks.3.hook_resid_post", model_name="vit-b",
                                      metadata={"cls_only": False}))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p))
    out = sae.save_pretrained(tmp_path / "sae")
    assert sorted(f.name for f in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temp folder left behind
    want = {"W_enc": (D_IN, 96), "W_dec": (96, D_IN), "b_enc": (96,), "b_dec": (D_IN,)}
    if arch == "jumprelu":
        want["threshold"] = (96,)
    weights = load_file(out / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == want
    assert {v.dtype for v in weights.values()} == {getattr(torch, dtype)}
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == arch and (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, 96, dtype)
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["metadata"]["model_name"] == "vit-b"
    assert cfg.get("k") == (7 if arch == "topk" else None)
    back = SparseAutoencoder.from_pretrained(out)
    assert back.config == sae.config
    x = torch.randn(10, D_IN)
    assert_round_trip(back, sae, lambda m: m(x.double()))


def test_save_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    sae = SparseAutoencoder(SAEConfig(8, 16))
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        sae.save_pretrained(tmp_path / "sae")
    assert (tmp_path / "sae" / "notes.txt").exists()
    sae.save_pretrained(tmp_path / "sae", overwrite=True)
    assert sorted(f.name for f in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_loads_saelens_written_folders_and_rejects_broken_ones(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(8, 16, generator=g), "W_dec": torch.randn(16, 8, generator=g),
         "b_enc": torch.randn(16, generator=g), "b_dec": torch.randn(8, generator=g)}

    def folder(name, cfg, weights):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cfg.json").write_text(json.dumps(cfg))
        save_file(weights, tmp_path / name / "sae_weights.safetensors")
        return tmp_path / name

    v6 = {"d_in": 8, "d_sae": 16, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
          "normalize_activations": "none", "reshape_activations": "none", "architecture": "jumprelu",
          "metadata": {"sae_lens_version": "6.5.0", "model_name": "gemma-2-2b",
                       "hook_name": "blocks.0.hook_resid_post"}}
    sae = SparseAutoencoder.from_pretrained(folder("v6", v6, {**w, "threshold": torch.rand(16, generator=g)}))
    assert (sae.config.architecture, sae.config.hook_name, sae.config.apply_b_dec_to_input) == \
        ("jumprelu", "blocks.0.hook_resid_post", False)
    pre6 = {"d_in": 8, "d_sae": 16, "dtype": "torch.float32", "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 3}, "hook_point": "blocks.2.hook_resid_pre", "model_name": "gpt2"}
    old = SparseAutoencoder.from_pretrained(folder("pre6", pre6, w))
    assert (old.config.k, old.config.hook_name, old.config.dtype) == (3, "blocks.2.hook_resid_pre", "float32")
    with pytest.raises(SAEError, match=r"missing \['threshold'\]"):
        SparseAutoencoder.from_pretrained(folder("wrong", {**v6}, w))  # says jumprelu, has no threshold
    with pytest.raises(SAEError, match="hf-ext loads standard, topk, jumprelu"):
        SparseAutoencoder.from_pretrained(folder("gated", {**v6, "architecture": "gated"}, w))
    with pytest.raises(SAEError, match="has no sae_weights.safetensors"):
        (tmp_path / "half").mkdir(), (tmp_path / "half" / "cfg.json").write_text(json.dumps(v6))
        SparseAutoencoder.from_pretrained(tmp_path / "half")


def test_trains_from_an_hf_ext_store_and_never_on_held_out_rows(store):
    class Recording(ShardedDataset):
        calls: list = []

        def __getitems__(self, indices):
            self.calls.append(np.asarray(indices).copy())
            return super().__getitems__(indices)

    ds = Recording(store)
    sae, log = train_sae(ds, SAEConfig(D_IN, 64, "topk", k=4), SAETrainConfig(total_rows=256 * 20, **FAST),
                         progress=False)
    train_idx, eval_idx = split_indices(ROWS, 20)
    assert np.intersect1d(train_idx, eval_idx).size == 0 and len(train_idx) + len(eval_idx) == ROWS
    assert (log["train_rows"], log["eval_rows"]) == (len(train_idx), len(eval_idx)) == (7782, 410)
    *training, final_eval = ds.calls
    read = np.concatenate(training)
    assert read.size >= 20 * 256 and not np.isin(read, eval_idx).any()
    assert np.array_equal(np.sort(final_eval), eval_idx)
    assert (sae.config.hook_name, sae.config.model_name, sae.config.metadata) == \
        ("blocks.1.hook_resid_post", "toy-vit", {"cls_only": True})


def test_wrong_store_width_fails_before_training(tmp_path, capsys):
    write_rows([np.zeros((64, 24), np.float32)], tmp_path / "narrow", dtype="float32", name="activations")
    with pytest.raises(DataFormatError, match=r"shape \(24,\), the SAE expects d_in=32; set SAEConfig\(d_in=24\)"):
        train_sae(tmp_path / "narrow", SAEConfig(D_IN, 64), SAETrainConfig(batch_size=8))
    with pytest.raises(DataFormatError, match="has no field 'acts'"):
        train_sae(tmp_path / "narrow", SAEConfig(24, 64), SAETrainConfig(batch_size=8, field="acts"))
    assert "SAE" not in capsys.readouterr().err  # no progress bar: nothing started
    assert issubclass(DataFormatError, HfExtError)


@pytest.mark.parametrize("kw,fix", [(dict(architecture="topk", k=0), "1 <= k <= d_sae"),
                                    (dict(architecture="topk", k=65), "lower k or raise d_sae"),
                                    (dict(architecture="gated"), "use one of standard, topk, jumprelu"),
                                    (dict(d_sae=0), "both must be >= 1"),
                                    (dict(dtype="int8"), "use one of float32, float16, bfloat16"),
                                    (dict(architecture="jumprelu", jumprelu_bandwidth=0), "must be > 0")])
def test_bad_sae_config_names_the_fix(kw, fix):
    with pytest.raises(SAEError, match=fix) as e:
        SAEConfig(**{"d_in": 32, "d_sae": 64, **kw})
    assert isinstance(e.value, HfExtError) and isinstance(e.value, ValueError)


def test_bad_train_config_names_the_fix():
    with pytest.raises(SAEError, match="use 0 \\(none\\) or >= 2"):
        SAETrainConfig(eval_every=1)
    with pytest.raises(SAEError, match="between 0 and 1"):
        SAETrainConfig(warmup_fraction=1.5)


def test_train_sae_under_ddp_two_cpu_processes(store, tmp_path):
    """Two gloo ranks (torchrun; ``accelerate launch --cpu`` starts one): replicas stay identical, resampling too."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch
        from accelerate import Accelerator
        from hf_ext.vit_hooks.sae import SAEConfig, SAETrainConfig, SparseAutoencoder, train_sae
        acc = Accelerator(cpu=True)
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig({D_IN}, 64, l1_coefficient=0.3))
        with torch.no_grad():
            sae.b_enc[:32] = -100.0
        tc = SAETrainConfig(batch_size=128, total_rows=256 * 60, lr=3e-3, resample_every=25, dead_window=10)
        sae, log = train_sae({str(store)!r}, None, tc, accelerator=acc, progress=False, sae=sae)
        print(json.dumps({{"rank": acc.process_index, "n": acc.num_processes, "steps": log["steps"],
                           "resampled": log["resampled"], "w": [p.double().sum().item() for p in sae.parameters()]}}))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", r.stdout)]  # the ranks' prints may interleave
    assert sorted(x["rank"] for x in rows) == [0, 1] and all(x["n"] == 2 and x["steps"] == 60 for x in rows)
    assert rows[0]["resampled"] == rows[1]["resampled"] >= 32
    # both replicas apply the same all-reduced gradient, so they stay equal; 1e-6 on sums of ~4200 weights is
    # far below what one diverged Adam step (lr 3e-3 per weight) or a missed resample would move them
    assert rows[0]["w"] == pytest.approx(rows[1]["w"], abs=1e-6)
