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
