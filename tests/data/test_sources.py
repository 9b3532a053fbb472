"""hf_ext.data writers on real inputs (tokenizer, photos), `hf-ext data`, HF datasets, litdata, 2 ranks.

Every comparison here is data movement (tokens and pixels written to shards and read back, copied by litdata,
converted to and from HF datasets, PNG being lossless) or integer bookkeeping, so ``torch.equal`` /
``np.array_equal`` are exact on every machine (tests/numerics.py, kind 1).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conversion.cli import main
from hf_ext.data import (DataFormatError, ShardedDataset, decode_images, fetch_store, from_hf_dataset, to_hf_dataset,
                         write_token_windows)
from hf_ext.data.sources import load_image, token_dtype
from hf_ext.zoo import corpus_files, real_images, resolve_model

ROOT = Path(__file__).resolve().parents[2]

# SmolLM2's tokenizer, python3.11-doc text (python-docs:*) and scikit-image's photos: the offline real assets
pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def docs():
    return corpus_files("python-docs:eval")[:6]


def _expected_windows(tok, files, window):
    ids = []
    for f in files:
        ids += tok(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        ids.append(tok.eos_token_id)
    n = len(ids) // window
    return torch.tensor(ids[: n * window]).view(n, window)


def test_cli_tokens_round_trip_is_exact(tmp_path, tok, docs, capsys):
    out = tmp_path / "tok"
    args = ["data", "tokens", "--tokenizer", "smollm2-135m", "--window", "128", "--shard-records", "50",
            "--out", str(out), "--json", "--text-files", *map(str, docs)]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = _expected_windows(tok, docs, 128)
    assert res["windows"] == len(want) and res["tokens"] == want.numel() and res["dtype"] == "uint16"
    assert res["bytes"] == sum(p.stat().st_size for p in out.glob("shard-*.hfd"))
    ds = ShardedDataset(out)
    assert torch.equal(ds.__getitems__(range(len(ds)))["input_ids"].long(), want)
    prov = ds.provenance
    assert prov["tokenizer"] == "smollm2-135m" and prov["vocab_size"] == len(tok)
    assert [s["file"] for s in prov["sources"]] == list(map(str, docs)) and len(prov["sources"][0]["sha256"]) == 64
    assert main(args) == 2 and "already exists and is complete" in capsys.readouterr().err


def test_interrupted_tokenization_resumes(tmp_path, tok, docs):
    calls = {"n": 0}

    class Flaky:
        eos_token_id, name_or_path = tok.eos_token_id, "flaky"

        def __len__(self):
            return len(tok)

        def __call__(self, text, **kw):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return tok(text, **kw)

    with pytest.raises(KeyboardInterrupt):
        write_token_windows(docs, Flaky(), 128, tmp_path / "tok", shard_records=20, progress=False)
    assert 0 < json.loads((tmp_path / "tok" / "index.json").read_text())["count"]
    write_token_windows(docs, Flaky(), 128, tmp_path / "tok", shard_records=20, progress=False)
    ds = ShardedDataset(tmp_path / "tok")
    assert torch.equal(ds.__getitems__(range(len(ds)))["input_ids"].long(), _expected_windows(tok, docs, 128))


def test_token_dtype_and_bad_input(tmp_path, capsys):
    assert token_dtype(49152) == "uint16" and token_dtype(151936) == "uint32"
    with pytest.raises(DataFormatError, match="151936 ids, more than uint16 holds .* use --dtype uint32"):
        token_dtype(151936, "uint16")
    assert main(["data", "tokens", "--text-files", str(tmp_path / "none.txt"), "--tokenizer", "smollm2-135m",
                 "--out", str(tmp_path / "o")]) == 2
    assert "neither a file" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["data", "tokens", "--text-files", "python-docs:eval", "--tokenizer", "smollm2-135m",
                 "--window", "1", "--out", str(tmp_path / "o")]) == 2
    assert "at least 2 tokens" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "short.txt").write_text("Too short.")
    assert main(["data", "tokens", "--text-files", str(tmp_path / "short.txt"), "--tokenizer", "smollm2-135m",
                 "--window", "64", "--out", str(tmp_path / "o")]) == 2
    assert "fewer than one window of 64" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Real photos in two class folders, as ImageFolder expects."""
    d = tmp_path_factory.mktemp("photos")
    for i, p in enumerate(real_images()[:10]):
        (d / ("even" if i % 2 == 0 else "odd")).mkdir(exist_ok=True)
        shutil.copy(p, d / ("even" if i % 2 == 0 else "odd") / p.name)
    return d


def test_cli_images_raw_round_trip_with_labels(tmp_path, photo_dir, capsys):
    assert main(["data", "images", "--dir", str(photo_dir), "--size", "32", "--out", str(tmp_path / "im"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 10 and res["classes"] == 2
    ds = ShardedDataset(tmp_path / "im")
    b = ds.__getitems__(range(10))
    files = sorted(p for p in photo_dir.rglob("*.png") if p.is_file()) + sorted(photo_dir.rglob("*.jpg"))
    files = sorted(files)
    assert b["image"].shape == (10, 32, 32, 3) and b["image"].dtype == torch.uint8
    for i, f in enumerate(files):
        assert np.array_equal(b["image"][i].numpy(), load_image(f, 32))
        assert b["label"][i].item() == ["even", "odd"].index(f.parent.name)


def test_encoded_images_decode_to_the_stored_pixels(tmp_path, photo_dir, capsys):
    assert main(["data", "images", "--dir", str(photo_dir), "--size", "48", "--encode", "png",
                 "--out", str(tmp_path / "png")]) == 0
    assert main(["data", "images", "--dir", str(photo_dir), "--size", "48", "--out", str(tmp_path / "raw")]) == 0
    raw = ShardedDataset(tmp_path / "raw").__getitems__(range(10))["image"]
    enc = ShardedDataset(tmp_path / "png").__getitems__(range(10))["image"]
    assert isinstance(enc, list) and torch.equal(decode_images(enc), raw)          # PNG is lossless
    assert main(["data", "images", "--dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_hf_datasets_both_ways(tmp_path, docs):
    write_token_windows(docs[:2], "smollm2-135m", 64, tmp_path / "tok", progress=False)
    hf = to_hf_dataset(tmp_path / "tok", cache_dir=str(tmp_path / "cache"))
    ours = ShardedDataset(tmp_path / "tok").__getitems__(range(len(hf)))["input_ids"]
    assert hf.features["input_ids"].length == 64 and np.array_equal(np.asarray(hf["input_ids"]), ours.numpy())
    from_hf_dataset(hf, tmp_path / "back")
    back = ShardedDataset(tmp_path / "back")
    assert back.fields[0].dtype == "uint16" and torch.equal(back.__getitems__(range(len(back)))["input_ids"], ours)

    import datasets

    mixed = datasets.Dataset.from_dict({"text": ["a", "bcd"], "y": [1.5, -2.0], "pix": [[[1, 2]], [[3, 4]]]})
    from_hf_dataset(mixed, tmp_path / "mixed")
    b = ShardedDataset(tmp_path / "mixed").__getitems__([1, 0])
    assert [bytes(t.numpy()) for t in b["text"]] == [b"bcd", b"a"] and b["y"].tolist() == [-2.0, 1.5]
    assert b["pix"].tolist() == [[[3, 4]], [[1, 2]]]
    ragged = datasets.Dataset.from_dict({"ids": [[1, 2], [3]]})
    with pytest.raises(DataFormatError, match="rows of different shapes"):
        from_hf_dataset(ragged, tmp_path / "ragged")


def test_fetch_store_through_litdata(tmp_path, docs):
    import litdata  # noqa: F401  (a dev dependency: the test must fail, not skip, without it)

    write_token_windows(docs[:2], "smollm2-135m", 64, tmp_path / "remote", shard_records=30, progress=False)
    local = fetch_store(str(tmp_path / "remote"), tmp_path / "cache")
    a, b = ShardedDataset(tmp_path / "remote"), ShardedDataset(local)
    assert len(b.shards) > 1 and torch.equal(a.__getitems__(range(len(a)))["input_ids"],
                                             b.__getitems__(range(len(b)))["input_ids"])
    with pytest.raises(DataFormatError, match="could not fetch"):
        fetch_store(str(tmp_path / "missing"), tmp_path / "cache2")


def test_two_processes_read_disjoint_halves(tmp_path, docs):
    write_token_windows(docs[:2], "smollm2-135m", 64, tmp_path / "tok", shard_records=30, progress=False)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch
        from accelerate import Accelerator
        from hf_ext.data import Loader, OrderSampler, ShardedDataset
        acc = Accelerator(cpu=True)
        ds = ShardedDataset({str(tmp_path / 'tok')!r}, with_index=True)
        ours = [b["index"].tolist() for b in Loader(ds, batch_size=4, order="quasi_random", seed=1)]
        dl = torch.utils.data.DataLoader(ds, batch_size=4, sampler=OrderSampler(ds, seed=1),
                                         collate_fn=ds.collate)
        prepared = [b["index"].tolist() for b in acc.prepare(dl)]
        print(json.dumps({{"rank": acc.process_index, "ours": sum(ours, []), "prepared": sum(prepared, []),
                           "n": len(ds)}}))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = sorted((json.loads(m) for m in re.findall(r"\{[^{}]*\}", r.stdout)), key=lambda x: x["rank"])
    n = rows[0]["n"]
    assert [x["rank"] for x in rows] == [0, 1]
    assert not set(rows[0]["ours"]) & set(rows[1]["ours"]) and sorted(rows[0]["ours"] + rows[1]["ours"]) == list(range(n))
    # accelerate shards the sampler's batches itself (padding the last one to keep the ranks in step)
    assert not set(rows[0]["prepared"][:8]) & set(rows[1]["prepared"][:8])
    assert set(rows[0]["prepared"]) | set(rows[1]["prepared"]) == set(range(n))
