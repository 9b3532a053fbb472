"""Expert-aware batching: every request served once, fewest experts per batch, bounded waits."""
import random
from itertools import combinations

import pytest

from hf_ext.moe import MoEError
from hf_ext.moe.batching import ExpertBatcher


def fewest_experts(sizes: list[int], budget: int) -> int:
    """Brute force: the fewest queues whose tokens can fill min(budget, all queued)."""
    need = min(budget, sum(sizes))
    for k in range(len(sizes) + 1):
        if any(sum(c) >= need for c in combinations(sizes, k)):
            return k
    raise AssertionError


@pytest.mark.parametrize("seed", range(20))
def test_each_batch_touches_the_fewest_experts_and_serves_every_request_once(seed):
    rng = random.Random(seed)
    b, experts_of, served = ExpertBatcher(max_tokens=rng.randint(1, 9)), {}, []
    for i in range(rng.randint(1, 40)):
        experts_of[i] = rng.randrange(6)
        b.add(i, experts_of[i])
    while len(b):
        sizes = [len(q) for q in b.queues.values() if q]
        batch = b.next_batch()
        assert 0 < len(batch) <= b.max_tokens
        assert len({experts_of[r] for r in batch}) == fewest_experts(sizes, b.max_tokens)
        served += batch
    assert sorted(served) == sorted(experts_of) and b.next_batch() == []


def test_fcfs_serves_in_arrival_order():
    b = ExpertBatcher(max_tokens=2, policy="fcfs")
    for r, e in [("a", 1), ("b", 0), ("c", 1), ("d", 2)]:
        b.add(r, e)
    assert b.next_batch() == ["a", "b"] and b.next_batch() == ["c", "d"]


def test_a_rare_expert_starves_without_max_wait_and_is_served_with_it():
    """Two busy experts keep their queues longer than the budget; request 'x' of expert 9 waits."""
    def run(max_wait):
        b = ExpertBatcher(max_tokens=4, max_wait=max_wait)
        b.add("x", 9)
        for step in range(30):
            for j in range(4):
                b.add((step, j), step % 2)
            if "x" in b.next_batch():
                return step
        return None

    assert run(None) is None
    assert run(5) == 5


@pytest.mark.parametrize("kwargs, match", [({"max_tokens": 0}, "at least one token"),
                                           ({"max_tokens": 4, "policy": "sjf"}, "expert, fcfs"),
                                           ({"max_tokens": 4, "max_wait": 0}, "max_wait=0")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(MoEError, match=match):
        ExpertBatcher(**kwargs)
