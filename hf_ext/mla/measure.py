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
def filled_cache(model, context: int, batch: int = 1, static: bool = False, room: int = 0, device="cpu"):
    """A cache of ``model``'s own layer types holding ``context`` tokens of random states, and the next token.

    Decode speed does not depend on what the cache holds, only on its shapes, so this skips a prefill (a 16k x 8
    prefill takes minutes on a CPU). ``static``: a ``StaticCache`` of ``context + room`` slots."""
    from transformers import DynamicCache, StaticCache

    cache = (StaticCache(config=model.config, max_cache_len=context + room) if static
             else DynamicCache(config=model.config))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(model.config.vocab_size, (batch, 1), generator=g).to(device)
    out = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)  # each layer learns its shapes, dtype
    for layer in cache.layers:
        k, v = layer.keys[:, :, :1], layer.values[:, :, :1]
        layer.update(torch.randn(*k.shape[:2], context - 1, k.shape[-1], dtype=k.dtype, device=device),
                     torch.randn(*v.shape[:2], context - 1, v.shape[-1], dtype=v.dtype, device=device))
    return cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_tokens_per_s(model, context: int, new_tokens: int = 32, batch: int = 1, device="cpu",
                        static: bool = False, compiled: bool = False, reps: int = 3) -> float:
    """Greedy decode tokens/s (all rows) after ``context`` cached tokens (``filled_cache``; not timed): the
    median of ``reps`` runs of ``new_tokens`` steps, each continuing the same cache.

    ``static``: a preallocated ``StaticCache``; ``compiled``: the decode step through ``torch.compile``
    (fullgraph, static shapes, a fresh compile), warmed up (compiled) before the clock starts."""
    cache, nxt = filled_cache(model, context, batch, static, room=reps * new_tokens + 2, device=device)
    if compiled:
        torch._dynamo.reset()                            # no stale graphs, and no recompile limit reached
    step = torch.compile(model.forward, fullgraph=True, dynamic=False) if compiled else model.forward
    pos = context

    def one(nxt, pos):
        out = step(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1,
                   position_ids=torch.full((batch, 1), pos, device=device))
        return out.logits[:, -1:].argmax(-1)

    for _ in range(2 if compiled else 0):                # compile (and any guard recompile) outside the clock
        nxt, pos = one(nxt, pos), pos + 1
    times = []
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            nxt, pos = one(nxt, pos), pos + 1
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch * new_tokens / sorted(times)[len(times) // 2]


def conversion_figures(source, mla, tokenizer, eval_text: str, max_tokens: int | None = 4096,
                       window: int = 512) -> dict:
    """Held-out perplexity of the source and the MLA model on ``eval_text``, and the KV-cache bytes per token
    of each (``kv_bytes_per_token`` on a short prompt): what ``hf-ext convert mla`` reports and writes to the
    model card."""
    from ..eval import perplexity

    prompt = torch.tensor([tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]])
    ev = dict(max_tokens=max_tokens, window=window)
    return {"ppl_source": perplexity(source, tokenizer, eval_text, **ev)["ppl"],
            "ppl_upcycled": perplexity(mla, tokenizer, eval_text, **ev)["ppl"],
            "kv_bytes_per_token_source": kv_bytes_per_token(source, prompt),
            "kv_bytes_per_token": kv_bytes_per_token(mla, prompt)}
