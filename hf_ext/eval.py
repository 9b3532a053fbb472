"""Perplexity: the one quality measure every LLM technique in hf-ext reports.

Definition (kept deliberately simple, so anyone can recompute it with plain transformers):
    take the first ``max_tokens`` tokens of the text (tokenized without special tokens), cut them into
    non-overlapping windows of ``window`` tokens, score every window on its own (no context carried
    over, the first token of each window unscored), and return exp(mean NLL over all scored tokens).

Example:
    >>> from hf_ext.zoo import load_causal_lm, load_corpus
    >>> from hf_ext.eval import perplexity
    >>> model, tok = load_causal_lm("smollm2-135m")                               # doctest: +SKIP
    >>> perplexity(model, tok, load_corpus("python-docs:eval"), max_tokens=4096)  # doctest: +SKIP
    {'ppl': ..., 'tokens': 4096, 'scored_tokens': 4088, 'windows': 8, 'nll': ...}
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import BadTextError


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """(N,) token ids of ``text`` without special tokens, cut to ``max_tokens``."""
    # Cap the characters first: tokenizing 11 MB of docs to keep 4k tokens would waste seconds.
    def enc(t):
        return tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    if max_tokens is None:
        return enc(text)
    ids = enc(text[: max_tokens * 16])
    if len(ids) <= max_tokens and len(text) > max_tokens * 16:  # very long tokens: fall back to everything
        ids = enc(text)
    return ids[:max_tokens]


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, window: int = 512, batch_size: int = 4, progress: bool = True):
    """Sum of token NLL and count of scored tokens over non-overlapping windows of ``ids`` (N,)."""
    from tqdm.auto import tqdm

    if window < 2:
        raise BadTextError(f"window={window} scores no token; use a window of at least 2 tokens")
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise BadTextError(f"the text gives {len(ids)} token(s); perplexity needs at least 2, give more text")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # Full windows are batched; the ragged last one goes alone (no padding, so nothing to mask).
    groups: list[list[torch.Tensor]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and len(groups[-1][0]) == len(w):
            groups[-1].append(w)
        else:
            groups.append([w])
    for g in tqdm(groups, desc="perplexity", unit="batch", disable=not progress, leave=False):
        x = torch.stack(g).to(device)                                  # (B, W)
        logits = model(input_ids=x).logits.float()                     # (B, W, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return total, count, len(windows)


def perplexity(model, tokenizer, text: str, max_tokens: int | None = None, window: int = 512,
               batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``text`` by the definition in this module's docstring."""
    if window < 2:
        raise BadTextError(f"window={window} scores no token; use --window 2 or more")
    if not text or not text.strip():
        raise BadTextError("the text is empty; give a file with some text in it")
    ids = tokenize(tokenizer, text, max_tokens)
    was_training = model.training
    model.eval()
    try:
        total, count, n_windows = window_nll(model, ids, window, batch_size, progress)
    finally:
        model.train(was_training)
    return {"ppl": math.exp(total / count), "tokens": len(ids), "scored_tokens": count,
            "windows": n_windows, "nll": total / count}


@torch.no_grad()
def llamacpp_protocol_perplexity(model, tokenizer, text: str, n_ctx: int = 512, n_chunks: int | None = None,
                                 batch_size: int = 4) -> dict:
    """Perplexity by ``llama-perplexity``'s protocol, so our model and llama.cpp's run of the same weights
    give the same figure: tokenize the whole text (with BOS where the tokenizer adds one), cut it into
    len // n_ctx chunks of n_ctx tokens (BOS replaces each chunk's first token when added), and score only
    the tokens after the first n_ctx / 2 of each chunk (n_ctx - n_ctx/2 - 1 per chunk).
    """
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]                  # (N,) with special tokens
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and len(ids) > 0 and ids[0].item() == bos and \
        tokenizer(text, add_special_tokens=False)["input_ids"][:1] != [bos]
    chunks = len(ids) // n_ctx if n_chunks is None else min(n_chunks, len(ids) // n_ctx)
    if chunks < 1 or len(ids) < 2 * n_ctx:
        raise BadTextError(f"the text gives {len(ids)} tokens; llama-perplexity's protocol needs at least "
                           f"2 x n_ctx = {2 * n_ctx}: give more text or a smaller n_ctx")
    x = ids[: chunks * n_ctx].view(chunks, n_ctx).clone()                       # (C, n_ctx)
    if add_bos:
        x[:, 0] = bos
    first = n_ctx // 2
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in x.split(batch_size):
        logits = model(input_ids=b.to(device)).logits.float()                   # (B, n_ctx, V)
        nll = F.cross_entropy(logits[:, first:-1].flatten(0, 1), b[:, first + 1:].flatten().to(device),
                              reduction="sum")
        total += nll.item()
        count += b[:, first + 1:].numel()
    return {"ppl": math.exp(total / count), "nll": total / count, "n_chunks": chunks, "scored_tokens": count}
