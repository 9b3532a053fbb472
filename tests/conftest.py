"""Shared fixtures: tiny random configs (hidden 32, 2 layers, seed 0) and the `real` marker.

Real tests (`@pytest.mark.real`) use the offline checkpoints of REAL_ASSETS.md; CI runs them too.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
