"""Measurements shared by the CLI, the tests and benchmarks/mla.py."""
from __future__ import annotations

import time

import torch

from .modeling_mla import latent_cache_bytes


@torch.no_grad()
def kv_bytes_per_token(model, input_ids: torch.Tensor, new_tokens: int = 8) -> float:
    """Cache bytes per token per layer, measured on the cache tensors that ``generate`` leaves behind."""
    out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    cache = out.cache
    tokens = cache.get_seq_length() * input_ids.shape[0]
    return latent_cache_bytes(cache) / (tokens * len(cache.layers))


@torch.no_grad()
def decode_tokens_per_s(model, context: int, new_tokens: int = 32, batch: int = 1, vocab: int = 1000,
                        device="cpu") -> float:
    """Greedy decode speed after a prefill of ``context`` random tokens (prefill time excluded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, vocab, (batch, context), generator=g).to(device)
    out = model(input_ids=x, use_cache=True, logits_to_keep=1)  # full-context logits would not fit
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    del out
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    if device != "cpu":
        torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - t0)
