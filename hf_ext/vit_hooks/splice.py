"""The downstream cost of an SAE: splice its reconstruction into the model at its hook point.

For each batch we run the model three times: clean, with the hook point replaced by the SAE's
reconstruction, and with it zero-ablated. ``loss_recovered = (zero - spliced) / (zero - clean)`` (1: the
SAE loses nothing the model uses; 0: as bad as deleting the activation), as in SAELens' evals.

Example:
    >>> from hf_ext.vit_hooks.splice import spliced_loss, next_token_loss
    >>> spliced_loss(HookedVision(lm), sae, "blocks.15.hook_resid_post", batches, next_token_loss)  # doctest: +SKIP
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .hooked import HookedVision


def next_token_loss(out, batch, clean=None) -> torch.Tensor:
    """Causal-LM cross-entropy of the batch's ``input_ids``."""
    logits, ids = out.logits[:, :-1].float(), batch["input_ids"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten())


def embedding_cosine_loss(out, batch, clean=None) -> torch.Tensor:
    """1 - cosine of mean-pooled token states (sentence embeddings, as all-MiniLM uses) to the clean ones."""
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pool = lambda h: (h * mask).sum(1) / mask.sum(1)  # noqa: E731
    ref = out.last_hidden_state if clean is None else clean.last_hidden_state
    return 1 - F.cosine_similarity(pool(out.last_hidden_state), pool(ref), dim=-1).mean()


@torch.no_grad()
def spliced_loss(hooked: HookedVision, sae, hook_name: str, batches, loss_fn) -> dict:
    """Mean ``loss_fn`` clean, spliced and zero-ablated over ``batches`` (dicts of model inputs)."""
    hooked.check_name(hook_name)
    sums = {"clean": 0.0, "spliced": 0.0, "zero_ablated": 0.0}
    n = 0
    param = next(sae.parameters())

    def splice(a, hook):
        return sae(a.to(param.dtype)).to(a.dtype)

    for batch in batches:
        clean = hooked.model(**batch)
        sums["clean"] += float(loss_fn(clean, batch, clean))
        sums["spliced"] += float(loss_fn(hooked.run_with_hooks(**batch, fwd_hooks=[(hook_name, splice)]), batch, clean))
        sums["zero_ablated"] += float(loss_fn(hooked.run_with_hooks(
            **batch, fwd_hooks=[(hook_name, lambda a, hook: torch.zeros_like(a))]), batch, clean))
        n += 1
    out = {f"loss_{k}": v / max(n, 1) for k, v in sums.items()}
    gap = out["loss_zero_ablated"] - out["loss_clean"]
    out["loss_recovered"] = (out["loss_zero_ablated"] - out["loss_spliced"]) / gap if gap else float("nan")
    return out
