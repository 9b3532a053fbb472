"""Expert-cache replacement policies, simulated on routing traces: none, LRU and Belady (with lookahead).

Read-ME routes a token to one expert before the backbone runs, so the serving system knows the future
expert sequence of queued tokens. With room for ``capacity`` experts in fast memory, Belady's rule (on a
miss, evict the resident expert whose next use is farthest away) is optimal, and the lookahead makes it
implementable. ``hits(trace, capacity, policy)`` counts hits; ``optimal_hits_brute_force`` is the
exhaustive reference the tests hold Belady to.

Example:
    >>> hits([0, 1, 2, 0, 1, 2], capacity=2, policy="belady"), hits([0, 1, 2, 0, 1, 2], 2, "lru")
    (2, 0)
"""
from __future__ import annotations

from functools import lru_cache

from .extract import MoEError

POLICIES = ("none", "lru", "belady")


def _check(capacity: int, policy: str) -> None:
    if capacity < 1:
        raise MoEError(f"cache capacity={capacity}; hold at least one expert in fast memory")
    if policy not in POLICIES:
        raise MoEError(f"policy '{policy}' is unknown; use one of {', '.join(POLICIES)}")


def hits(trace: list[int], capacity: int, policy: str = "belady", lookahead: int | None = None) -> int:
    """Cache hits when serving ``trace`` (expert ids in order) with ``capacity`` resident experts.

    ``lookahead`` bounds what Belady sees: only the next ``lookahead`` tokens are known (the queued
    requests); experts not needed within it are evicted least recently used first.
    """
    _check(capacity, policy)
    if policy == "none":
        return 0
    last: dict[int, int] = {}                    # resident expert -> its last use
    nxt = _next_uses(trace)
    upcoming: dict[int, float] = {}              # resident expert -> its next use (Belady)
    count = 0
    for i, e in enumerate(trace):
        if e in last:
            count += 1
        elif len(last) >= capacity:
            if policy == "belady":
                seen = lambda v: upcoming[v] if lookahead is None or upcoming[v] - i <= lookahead else float("inf")  # noqa: E731
                victim = max(last, key=lambda v: (seen(v), -last[v]))
            else:
                victim = min(last, key=last.get)
            del last[victim]
            upcoming.pop(victim, None)
        last[e], upcoming[e] = i, nxt[i]
    return count


def _next_uses(trace: list[int]) -> list[float]:
    """For each position, the position of the same expert's next use (inf if none)."""
    out, seen = [float("inf")] * len(trace), {}
    for i in range(len(trace) - 1, -1, -1):
        out[i] = seen.get(trace[i], float("inf"))
        seen[trace[i]] = i
    return out


def optimal_hits_brute_force(trace: list[int], capacity: int) -> int:
    """The most hits any eviction choice achieves (exhaustive search; small traces only)."""
    _check(capacity, "belady")
    trace = tuple(trace)

    @lru_cache(maxsize=None)
    def best(i: int, resident: frozenset) -> int:
        if i == len(trace):
            return 0
        e = trace[i]
        if e in resident:
            return 1 + best(i + 1, resident)
        if len(resident) < capacity:
            return best(i + 1, resident | {e})
        return max(best(i + 1, (resident - {v}) | {e}) for v in resident)

    return best(0, frozenset())
