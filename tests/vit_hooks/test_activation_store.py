"""Activation stores: exact rows, CLS-only, resume after an interruption, CLI, bad input.

The stored rows are compared bit for bit (``torch.equal``) with the hooked activations: storing is data
movement, and the reference runs the same model on the same batches (same shapes, fresh memory), which is
the same computation (tests/numerics.py, kind 1). The images are synthetic PNGs, so only the CLI test needs
real assets (MiniLM and python3.11-doc text).
"""
from __future__ import annotations

import json

import pytest
import timm
import torch

from conversion.cli import main
from hf_ext.data import ShardedDataset
from hf_ext.vit_hooks import HookedVision, HookError
from hf_ext.vit_hooks.store import cache_activations, image_batches

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                             embed_dim=32, num_heads=4).eval()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six smooth random RGB and grey images of assorted sizes (resized and centre-cropped to 32 by the store)."""
    from PIL import Image

    d, g, files = tmp_path_factory.mktemp("photos"), torch.Generator().manual_seed(0), []
    for i, (w, h) in enumerate([(64, 48), (40, 40), (50, 90), (33, 70), (128, 64), (36, 36)]):
        small = torch.rand(3, 6, 6, generator=g)[None]
        px = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        px = ((px + 0.1 * torch.rand(3, h, w, generator=g)).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        files.append(d / f"img{i}.png")
        Image.fromarray(px if i % 3 else px[..., 0]).save(files[-1])       # every third one in greyscale
    return files


def test_rows_are_the_hooked_activations(vit, tmp_path, photos):
    files = photos[:5]
    hv = HookedVision(vit)
    index = cache_activations(hv, HOOK, image_batches(files, 32, batch_size=2), tmp_path / "all", sources=files,
                              shard_records=30, progress=False)
    # the same batches as the store saw: CPU GEMM kernels may differ in the last bits across batch sizes
    want = torch.cat([hv.run_with_cache(b[0], names_filter=HOOK)[1][HOOK].flatten(0, 1)
                      for b in image_batches(files, 32, batch_size=2)])   # (5 * 17, 32)
    ds = ShardedDataset(tmp_path / "all", dtypes={"activations": "float32"}, shapes={"activations": (32,)})
    assert index["count"] == 85 and torch.equal(ds.__getitems__(range(85))["activations"], want)
    assert ds.provenance["hook_name"] == HOOK and len(ds.provenance["sources"]) == 5
    cache_activations(hv, HOOK, image_batches(files, 32), tmp_path / "cls", cls_only=True, dtype="bfloat16",
                      progress=False)
    cls = ShardedDataset(tmp_path / "cls").__getitems__(range(5))["activations"]
    _, cache = hv.run_with_cache(torch.cat([b[0] for b in image_batches(files, 32)]), names_filter=HOOK)  # 1 batch
    assert cls.dtype == torch.bfloat16 and torch.equal(cls, cache[HOOK][:, 0].bfloat16())


def test_interrupted_caching_resumes_to_the_same_store(vit, tmp_path, photos):
    files = photos[:6]
    hv = HookedVision(vit)

    def flaky(n_ok):
        for i, b in enumerate(image_batches(files, 32, batch_size=1)):
            if i == n_ok:
                raise KeyboardInterrupt
            yield b

    cache_activations(hv, HOOK, image_batches(files, 32, batch_size=1), tmp_path / "ref", shard_records=20, progress=False)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(hv, HOOK, flaky(4), tmp_path / "run", shard_records=20, progress=False)
    cache_activations(hv, HOOK, image_batches(files, 32, batch_size=1), tmp_path / "run", shard_records=20, progress=False)
    a, b = ShardedDataset(tmp_path / "ref"), ShardedDataset(tmp_path / "run")
    assert len(a) == len(b) == 102 and torch.equal(a.__getitems__(range(102))["activations"],
                                                   b.__getitems__(range(102))["activations"])


def test_bad_hooks_for_a_store(vit, tmp_path):
    hv = HookedVision(vit)
    with pytest.raises(HookError, match="store q/k/v/z or a residual point"):
        cache_activations(hv, "blocks.0.attn.hook_pattern", [], tmp_path / "x", progress=False)
    with pytest.raises(HookError, match="did you mean"):
        cache_activations(hv, "blocks.1.hook_resid_pots", [], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.real
def test_real_cli_caches_minilm_tokens(tmp_path, capsys):
    out = tmp_path / "acts"
    assert main(["hooks", "cache", "--model", "minilm-l6", "--hook", "blocks.3.hook_resid_post", "--text-file",
                 "python-docs:eval", "--max-rows", "2000", "--seq-len", "64", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["rows"] == 2000 and r["width"] == 384 and r["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert main(["hooks", "cache", "--model", "minilm-l6", "--hook", "blocks.3.hook_resid_post", "--images",
                 str(tmp_path), "--out", str(tmp_path / "bad")]) == 2
    assert "holds no images" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_append_more_images_equals_caching_them_all(vit, tmp_path, photos):
    files, hv = photos[:6], HookedVision(vit)
    # batches of 3 both times: CPU GEMM kernels may differ in the last bits across batch sizes
    cache_activations(hv, HOOK, image_batches(files, 32, batch_size=3), tmp_path / "all", sources=files,
                      progress=False)
    cache_activations(hv, HOOK, image_batches(files[:3], 32), tmp_path / "inc", sources=files[:3], progress=False)
    cache_activations(hv, HOOK, image_batches(files[3:], 32), tmp_path / "inc", sources=files[3:], append=True,
                      progress=False)
    a, b = ShardedDataset(tmp_path / "all"), ShardedDataset(tmp_path / "inc")
    assert len(b) == 102 and torch.equal(a.__getitems__(range(102))["activations"], b.__getitems__(range(102))["activations"])
    assert b.provenance["sources"] == a.provenance["sources"]
