"""Expert-cache replacement policies, simulated on routing traces: none, LRU and Belady (with lookahead).

Read-ME routes a token to one expert before the backbone runs, so the serving system knows the future
expert sequence of queued tokens. With room for ``capacity`` experts in fast memory, Belady's rule (on a
miss, evict the resident expert whose next use is farthest away) is optimal, and the lookahead makes it
implementable. ``hits(trace, capacity, policy)`` counts hits; ``optimal_hits_brute_force`` is the
exhaustive reference the tests hold Belady to.

Example:
    >>> hits([0, 1, 0, 2, 0, 1], capacity=2, policy="belady"), hits([0, 1, 0, 2, 0, 1], 2, "lru")
    (2, 2)
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


def hits(trace: list[int], capacity: int, policy: str = "belady") -> int:
    """Cache hits when serving ``trace`` (expert ids in order) with ``capacity`` resident experts."""
    _check(capacity, policy)
    if policy == "none":
        return 0
    resident: dict[int, int] = {}                # expert -> last use (LRU) or next use (Belady)
    nxt = _next_uses(trace) if policy == "belady" else None
    count = 0
    for i, e in enumerate(trace):
        if e in resident:
            count += 1
        elif len(resident) >= capacity:
            victim = max(resident, key=resident.get) if policy == "belady" else min(resident, key=resident.get)
            del resident[victim]
        resident[e] = nxt[i] if policy == "belady" else i
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
