"""Splitting independent pieces of work across replicas by estimated cost.

Pure Python: which replica computes which root is decided once, from static
shapes, so every replica (and every worker) derives the same assignment
without talking to the others.
"""


def root_cost(size):
    """Relative cost of one inverse root of a size×size matrix.

    Both methods are O(n³): eigh does ~9n³ flops, a coupled Newton iteration a
    few n³-flop matmuls; only the ratio between blocks matters here.
    """
    return int(size) ** 3


def greedy_partition(costs, num_shards):
    """Assigns items to `num_shards` shards, largest first, each to the least
    loaded shard (Graham's LPT rule: makespan within 4/3 of the optimum).

    Args:
        costs: non-negative cost of each item.
        num_shards: number of shards (replicas), at least 1.

    Returns:
        A list of `num_shards` lists of item indices, each in increasing
        order. Ties are broken by item index and then by shard index, so the
        result is deterministic.
    """
    num_shards = int(num_shards)
    if num_shards < 1:
        raise ValueError(
            f"`num_shards` must be >= 1. Received: num_shards={num_shards}"
        )
    costs = [float(c) for c in costs]
    if any(c < 0 for c in costs):
        raise ValueError(f"`costs` must be non-negative. Received: costs={costs}")
    shards = [[] for _ in range(num_shards)]
    loads = [0.0] * num_shards
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        shard = min(range(num_shards), key=lambda s: (loads[s], s))
        shards[shard].append(item)
        loads[shard] += costs[item]
    return [sorted(items) for items in shards]
