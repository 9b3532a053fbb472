"""Expert-aware batching (Read-ME, Algorithm 1): queue decode tokens by the expert the router gave them.

Paper: https://arxiv.org/abs/2410.19123, section 4.2. The pre-gating router picks each queued token's
expert before the backbone runs, and that expert serves the token in every layer. A batch waits, layer by
layer, for every expert it touches, so its latency grows with the number of distinct experts in it. The
batcher keeps one queue per expert and fills a token budget from the longest queues first: a whole queue
while it fits, then as much of the next longest as the budget allows. ``policy="fcfs"`` is the baseline
that takes the oldest tokens regardless of expert.

Beyond the paper, which has no fairness rule: with ``max_wait=w`` a queue that holds a token which has
waited ``w`` steps or more is served before any other (oldest first), so no request starves.

Items are decode tokens, one per request and step (a request re-enters with its next token once served).
Prefill spreads one request over many experts and is best run as its own step.

Example:
    >>> b = ExpertBatcher(max_tokens=3)
    >>> for request, expert in [("a", 0), ("b", 1), ("c", 0), ("d", 2)]:
    ...     b.add(request, expert)
    >>> b.next_batch()          # expert 0's queue (2 tokens) whole, then 1 token of the longest left
    ['a', 'c', 'b']
    >>> b.next_batch()
    ['d']
"""
from __future__ import annotations

from collections import deque
from itertools import count
from typing import Hashable

from .extract import MoEError

POLICIES = ("expert", "fcfs")


class ExpertBatcher:
    """One FIFO queue per expert; ``next_batch()`` returns up to ``max_tokens`` requests to run together."""

    def __init__(self, max_tokens: int, policy: str = "expert", max_wait: int | None = None):
        if max_tokens < 1:
            raise MoEError(f"max_tokens={max_tokens}; a batch must hold at least one token")
        if policy not in POLICIES:
            raise MoEError(f"batching policy '{policy}' is unknown; use one of {', '.join(POLICIES)}")
        if max_wait is not None and max_wait < 1:
            raise MoEError(f"max_wait={max_wait}; give at least 1 step, or None for no bound")
        self.max_tokens, self.policy, self.max_wait = max_tokens, policy, max_wait
        self.queues: dict[int, deque] = {}          # expert -> deque of (arrival order, step queued, request)
        self.step = 0                               # batches formed so far
        self._order = count()

    def add(self, request: Hashable, expert: int) -> None:
        """Queue ``request``, whose next token the router sent to ``expert``."""
        self.queues.setdefault(int(expert), deque()).append((next(self._order), self.step, request))

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _take(self, expert: int, n: int) -> list:
        q = self.queues[expert]
        return [q.popleft()[2] for _ in range(min(n, len(q)))]

    def next_batch(self) -> list:
        """The requests of the next batch (in queue order per expert); empty when nothing is queued."""
        batch: list = []
        if self.policy == "fcfs":
            while len(batch) < self.max_tokens and len(self):
                oldest = min((q[0][0], e) for e, q in self.queues.items() if q)[1]
                batch += self._take(oldest, 1)
        else:
            if self.max_wait is not None:                                  # overdue queues first, oldest first
                overdue = sorted((q[0][0], e) for e, q in self.queues.items()
                                 if q and self.step - q[0][1] >= self.max_wait)
                for _, e in overdue:
                    batch += self._take(e, self.max_tokens - len(batch))
            while len(batch) < self.max_tokens and len(self):              # Algorithm 1: longest queue first
                e = max((len(q), -q[0][0], e) for e, q in self.queues.items() if q)[2]
                batch += self._take(e, self.max_tokens - len(batch))
        self.step += 1
        return batch
