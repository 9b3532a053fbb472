"""``ExpertCache``: routed experts offloaded to a safetensors file, ``capacity`` per layer kept in RAM.

Read-ME's system half (https://arxiv.org/abs/2410.19123). The shared experts, attention and embeddings
stay resident; every routed expert of a ``PreGatedMoEForCausalLM`` is written to ``experts.safetensors``
and its parameters are dropped from the model. A layer asks the cache for expert d's weights; a miss
reads them lazily from the file (``safe_open``) and evicts by LRU, or by Belady's rule over the experts
of the queued tokens (the router decides them before the backbone runs: ``lookahead``). ``prefetch``
loads the next tokens' experts on a background thread, so the read overlaps the current token's compute.

Where the experts wait: ``store="disk"`` reads them lazily from the file; ``store="host"`` loads them all
into host RAM once (pinned when ``device`` is a GPU). Resident experts live on ``device``: on a GPU that is
device vs host memory, with misses and prefetches copied over (prefetches on their own CUDA stream,
each guarded by an event that the layer waits for); on the CPU it is RAM vs disk.

Example:
    >>> cache = ExpertCache.offload(moe, "experts/", capacity=4, policy="belady")   # doctest: +SKIP
    >>> cache.lookahead(moe.route(queued_ids)[0].tolist())                         # doctest: +SKIP
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import torch

from .extract import MoEError
from .policy import POLICIES

EXPERTS_FILE = "experts.safetensors"


class ExpertCache:
    """Per layer, at most ``capacity`` routed experts on ``device``; the rest read on demand from ``path``
    (``store="disk"``) or from host RAM (``store="host"``)."""

    def __init__(self, path: str | os.PathLike, layers: int, capacity: int, policy: str = "lru",
                 device: str | torch.device = "cpu", store: str = "disk"):
        from safetensors import safe_open

        if capacity < 1:
            raise MoEError(f"cache capacity={capacity}; hold at least one expert per layer in memory")
        if policy not in ("lru", "belady"):
            raise MoEError(f"policy '{policy}' is unknown; use 'lru' or 'belady' (see {POLICIES})")
        if store not in ("disk", "host"):
            raise MoEError(f"store '{store}' is unknown; use 'disk' (lazy file reads) or 'host' (all in host RAM)")
        self.path, self.capacity, self.policy, self.store = Path(path), capacity, policy, store
        self.device = torch.device(device)
        self.file = safe_open(str(self.path), framework="pt")
        cuda = self.device.type == "cuda"
        self.host = {k: (self.file.get_tensor(k).pin_memory() if cuda else self.file.get_tensor(k))
                     for k in self.file.keys()} if store == "host" else None
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.resident = [OrderedDict() for _ in range(layers)]    # layer -> {expert: (w_in, w_out, b_in, event)}
        self.future: list[int] = []                               # experts of the queued tokens, in order
        self.hits = self.misses = 0
        self.lock = threading.Lock()
        self._prefetch: threading.Thread | None = None

    @classmethod
    @torch.no_grad()
    def offload(cls, moe, folder: str | os.PathLike, capacity: int, policy: str = "lru",
                store: str = "disk") -> "ExpertCache":
        """Write ``moe``'s routed experts to ``folder/experts.safetensors``, drop them from the model, and
        serve them through a new cache (installed on every MoE MLP) on the model's device."""
        from safetensors.torch import save_file

        path = Path(folder) / EXPERTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for l, layer in enumerate(moe.model.layers):
            m = layer.mlp
            for d in range(m.routed_in.shape[0]):
                tensors[f"{l}.{d}.in"] = m.routed_in[d].contiguous().cpu()
                tensors[f"{l}.{d}.out"] = m.routed_out[d].contiguous().cpu()
                if m.routed_in_bias is not None:
                    tensors[f"{l}.{d}.bias"] = m.routed_in_bias[d].contiguous().cpu()
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, tmp)
        os.replace(tmp, path)
        cache = cls(path, len(moe.model.layers), capacity, policy, device=moe.device, store=store)
        for l, layer in enumerate(moe.model.layers):
            m = layer.mlp
            m.num_routed = m.routed_in.shape[0]
            m.routed_in = torch.nn.Parameter(torch.empty(0), requires_grad=False)   # freed: served by the cache
            m.routed_out = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            m.routed_in_bias = None
            m.expert_source = lambda d, l=l: cache.get(l, d)
        return cache

    def lookahead(self, experts: list[int]) -> None:
        """The experts of the tokens about to run, in order (Belady evicts the one needed last)."""
        self.future = list(experts)

    def _load(self, layer: int, d: int):
        """(w_in, w_out, b_in, ready event or None) of expert d, copied to ``device``."""
        keys = (f"{layer}.{d}.in", f"{layer}.{d}.out", f"{layer}.{d}.bias")
        read = self.host.get if self.host is not None else (
            lambda k: self.file.get_tensor(k) if k in self.file.keys() else None)
        ws = [read(k) for k in keys]
        if self.device.type == "cpu":
            return (*ws, None)
        ws = [None if w is None else w.to(self.device, non_blocking=True) for w in ws]
        event = None
        if torch.cuda.current_stream(self.device) == self.copy_stream:           # a prefetch: guard the copy
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return (*ws, event)

    def _victim(self, layer: int) -> int:
        res = self.resident[layer]
        if self.policy == "belady":
            nxt = {e: (self.future.index(e) if e in self.future else float("inf")) for e in res}
            order = list(res)                                        # oldest first: ties go to LRU
            return max(order, key=lambda e: (nxt[e], -order.index(e)))
        return next(iter(res))

    def get(self, layer: int, d: int, count: bool = True):
        """Expert d's (w_in, w_out, b_in) for ``layer``: from RAM, or read from disk (evicting one)."""
        with self.lock:
            res = self.resident[layer]
            if d in res:
                res.move_to_end(d)
                self.hits += count
            else:
                self.misses += count
                if len(res) >= self.capacity:
                    del res[self._victim(layer)]
                res[d] = self._load(layer, d)
            *ws, event = res[d]
        if event is not None and count:                 # a layer about to compute waits for a prefetched copy
            torch.cuda.current_stream(self.device).wait_event(event)
        return tuple(ws)

    def prefetch(self, experts: list[int]) -> None:
        """Load ``experts`` into every layer on a background thread (not counted as hits or misses)."""
        self.wait()

        def work():               # a resident expert is refreshed (LRU), a missing one read from disk
            with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else nullcontext():
                for layer in range(len(self.resident)):
                    for d in dict.fromkeys(experts):
                        self.get(layer, d, count=False)
        self._prefetch = threading.Thread(target=work, daemon=True)
        self._prefetch.start()

    def wait(self) -> None:
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.resident for ws in layer.values()
                   for t in ws[:3] if t is not None)
