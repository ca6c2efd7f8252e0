import itertools

import pytest

from tf_secondorder.distribute.sharding import greedy_partition, root_cost


def test_every_item_assigned_once_largest_first_to_least_loaded():
    costs = [root_cost(n) for n in (512, 512, 256, 128, 512, 64, 256, 8)]
    shares = greedy_partition(costs, 3)
    assert sorted(itertools.chain(*shares)) == list(range(len(costs)))
    # The three 512s go one to each replica, then the rest fill the lightest.
    assert [sorted(costs[i] for i in s)[-1] for s in shares] == [512**3] * 3
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) == 512**3 + 256**3  # optimal: two 256s cannot share


def test_lpt_bound_against_brute_force():
    costs = [7, 5, 4, 4, 3, 3, 2, 1]
    for shards in (2, 3):
        loads = [sum(costs[i] for i in s) for s in greedy_partition(costs, shards)]
        best = min(
            max(sum(c for c, a in zip(costs, assign) if a == k) for k in range(shards))
            for assign in itertools.product(range(shards), repeat=len(costs))
        )
        assert max(loads) <= 4 / 3 * best


def test_deterministic_and_more_shards_than_items():
    assert greedy_partition([1, 1, 1], 2) == [[0, 2], [1]]
    assert greedy_partition([3.0], 4) == [[0], [], [], []]
    assert greedy_partition([], 2) == [[], []]


@pytest.mark.parametrize(
    "costs, shards, match",
    [([1], 0, "num_shards"), ([1, -1], 2, "costs")],
)
def test_bad_input(costs, shards, match):
    with pytest.raises(ValueError, match=match):
        greedy_partition(costs, shards)
