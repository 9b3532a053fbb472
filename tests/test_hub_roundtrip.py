"""Hermetic Hub round trip with real parts: save -> ``hf_ext.hub.push`` -> olah -> ``snapshot_download``.

The push goes through the real huggingface_hub client (create_repo, preupload, LFS batch + PUT + verify, ndjson
commit) into ``tests/hub_server.py``, which commits into git repositories that an offline olah mirror serves back.
Everything binds 127.0.0.1; see ``tests/hub_fixtures.py``.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch

from hf_ext import hub as hf_hub_ext
from hub_fixtures import HUB_TOKEN, hub_env, hub_stack  # noqa: F401  (pytest fixtures)
from numerics import assert_round_trip


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=128, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def file_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save(model, out: Path) -> Path:
    if hasattr(hf_hub_ext, "save_converted"):
        return Path(hf_hub_ext.save_converted(model, out))
    model.save_pretrained(out)
    return out


def test_push_then_download_through_olah_is_byte_identical(hub_stack, hub_env, tmp_path):
    from huggingface_hub import snapshot_download
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    folder = save(model, tmp_path / "tiny-llama")
    local = file_digests(folder)
    assert "config.json" in local and "model.safetensors" in local, local

    repo_id = "hf-ext-test/tiny-llama"
    url = hf_hub_ext.push(folder, repo_id, endpoint=hub_stack.upload_url, token=HUB_TOKEN)

    # The commit landed in a real git repository, and the safetensors went through the LFS path.
    repo_dir = hub_stack.mirrors / "models" / repo_id
    head = subprocess.run(["git", "rev-parse", "refs/heads/main"], cwd=repo_dir, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert url == f"{hub_stack.upload_url}/{repo_id}/commit/{head}"
    commit = hub_stack.upload.commits[-1]
    assert commit["oid"] == head and "model.safetensors" in commit["lfs_files"], commit
    assert "config.json" in commit["files"], commit
    puts = [p for m, p in hub_stack.upload.requests if m == "PUT" and p.startswith("/lfs-objects/")]
    assert puts == [f"/lfs-objects/{local['model.safetensors']}"], puts
    assert file_digests(folder) == local, "push modified the local folder"

    # Pushing again (re-running `hf-ext push`) goes through create_repo's 409 "exists" path, and the LFS batch
    # reports the object as already stored, so it is not uploaded twice.
    url2 = hf_hub_ext.push(folder, repo_id, endpoint=hub_stack.upload_url, token=HUB_TOKEN)
    head = hub_stack.upload.commits[-1]["oid"]
    assert url2 == f"{hub_stack.upload_url}/{repo_id}/commit/{head}" != url
    assert [p for m, p in hub_stack.upload.requests if m == "PUT"] == puts

    # Read it back through olah, resolving the branch "main" there.
    snap = Path(snapshot_download(repo_id, endpoint=hub_stack.olah_url, revision="main",
                                  cache_dir=tmp_path / "download", token=False))
    assert snap.name == head, "olah resolved 'main' to another commit than the one pushed"
    assert file_digests(snap) == local

    reloaded = LlamaForCausalLM.from_pretrained(snap).eval()
    ids = torch.arange(16).reshape(2, 8) % 128
    with torch.no_grad():
        assert_round_trip(reloaded, model, lambda m: m(ids).logits)


def test_push_to_unreachable_endpoint_raises_and_keeps_folder(hub_env, tmp_path):
    folder = save(tiny_llama(), tmp_path / "tiny-llama")
    before = file_digests(folder)
    endpoint = "http://127.0.0.1:1"

    with pytest.raises(Exception) as info:
        hf_hub_ext.push(folder, "hf-ext-test/unreachable", endpoint=endpoint, token=HUB_TOKEN)

    err = info.value
    expected = getattr(hf_hub_ext, "HubPushError", None)
    if expected is not None:
        assert isinstance(err, expected), repr(err)
    assert "push" in str(err) and endpoint in str(err), str(err)
    # It failed because nothing listens there, not because of the suite's HF_HUB_OFFLINE=1.
    chain, e = [], err
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert not any(type(c).__name__ == "OfflineModeIsEnabled" for c in chain), chain
    assert any("connect" in (type(c).__name__ + str(c)).lower() for c in chain[1:]), chain
    assert file_digests(folder) == before
