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
