"""What a training step keeps for backward, measured on the autograd graph (not estimated)."""
from __future__ import annotations

import torch


def saved_activation_bytes(loss: torch.Tensor, model: torch.nn.Module | None = None) -> int:
    """Bytes of the tensors that ``loss``'s autograd graph holds for backward, deduplicated by storage.

    Walks every node reachable from ``loss.grad_fn`` and reads what it saved (``_saved_*`` of built-in
    nodes, ``saved_tensors`` of custom Functions such as MEFT's reversible stack or reentrant
    checkpointing). Parameters (of ``model`` too, and views of them) are not counted: they exist anyway.
    Call it after the forward and before ``backward()``.
    """
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
    storages: dict[int, int] = {}

    def add(v):
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            if not isinstance(v, torch.nn.Parameter) and st.data_ptr() not in skip:
                storages[st.data_ptr()] = st.nbytes()
        elif isinstance(v, (tuple, list)):
            for x in v:
                add(x)

    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_") or name == "saved_tensors":
                try:
                    add(getattr(node, name))
                except RuntimeError:  # a slot that holds nothing (e.g. an undefined optional tensor)
                    pass
        todo.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


def reversible_grad_error(peft_model, batch: dict, seed: int = 7) -> float:
    """|g_reversible - g_autograd| / |g_autograd| over the MEFT adapter gradients of one step on ``batch``
    (the same dropout masks in both runs): the check that the reversible backward can be trusted."""
    cfg = peft_model.base_model.peft_config[peft_model.active_adapter]
    keep, out = cfg.num_rev_layers, []
    for n_rev in (keep, 0):
        cfg.num_rev_layers = n_rev
        peft_model.zero_grad()
        torch.manual_seed(seed)
        peft_model(**batch).loss.backward()
        out.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                              for n, p in peft_model.named_parameters() if "meft_" in n and p.requires_grad]))
    cfg.num_rev_layers = keep
    return float((out[0] - out[1]).norm() / out[1].norm())
