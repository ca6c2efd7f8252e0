"""Independent pieces of work split across replicas, then exchanged.

Every replica of a data-parallel strategy holds the same optimizer statistics,
so computing every inverse root (or eigenbasis) on every replica wastes N−1 of
N. Which replica computes which item is decided once, from static shapes
(`greedy_partition`), so every replica and worker derives the same
assignment without talking; at a refresh `run_sharded` runs each replica's
share on that replica's device and all-gathers the results.

`run_sharded` is called in cross-replica context (after Keras's merge_call),
so a `tf.cond` around it holds no replica-context collective: the gather is
issued from cross-replica code by every worker for the same steps.
"""

import numpy as np
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compat.replica_state import from_local_replicas
from tf_secondorder.compression import packing


def root_cost(size):
    """Relative cost of one inverse root or eigendecomposition of a size×size
    matrix: O(n³) for every method; only ratios between items matter."""
    return int(size) ** 3


def greedy_partition(costs, num_shards):
    """Assigns items to `num_shards` shards, largest first, each to the least
    loaded shard (Graham's LPT rule: makespan within 4/3 of the optimum).

    Returns `num_shards` lists of item indices, each in increasing order. Ties
    go to the lower item index, then the lower shard: deterministic.
    """
    num_shards = validation.integer("num_shards", num_shards, 1)
    costs = [float(c) for c in costs]
    if any(not c >= 0 for c in costs):
        validation.fail("costs", "non-negative numbers", costs)
    shards = [[] for _ in range(num_shards)]
    loads = [0.0] * num_shards
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        shard = min(range(num_shards), key=lambda s: (loads[s], s))
        shards[shard].append(item)
        loads[shard] += costs[item]
    return [sorted(items) for items in shards]


def splits_work(strategy, mode):
    """Whether `mode` ("auto", True, False) splits work under `strategy`.

    "auto" and True split under MirroredStrategy and MultiWorkerMirroredStrategy
    with more than one replica. Other strategies (TPUStrategy,
    ParameterServer...) run the unsplit computation: their cross-replica code
    cannot place work on one replica's core.
    """
    if mode is False or strategy is None:
        return False
    if strategy.num_replicas_in_sync < 2:
        return False
    return isinstance(
        strategy,
        (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy),
    )


def run_sharded(strategy, shares, specs, compute):
    """Runs `compute(shares[r])` on replica r and gives every replica all results.

    Args:
        strategy: a MirroredStrategy or MultiWorkerMirroredStrategy; called
            in its cross-replica context.
        shares: one list of item ids per replica (from `greedy_partition`).
        specs: item id -> tuple of (shape, dtype), one per tensor of the item.
        compute: function(list of item ids) -> (dict item id -> tuple of
            tensors as in `specs`, int scalar count of failures).

    Returns:
        (dict item id -> tuple of tensors, total failures as int32). Results
        travel as int32 words, so every dtype arrives bit for bit.
    """
    words = {
        item: [packing.word_count(int(np.prod(shape)), dtype) for shape, dtype in spec]
        for item, spec in specs.items()
    }
    used = [sum(sum(words[i]) for i in share) for share in shares]
    # Equal lengths for the gather; the failure count goes last.
    length = max(used) + 1

    def share_buffer(k, context):
        replica = context.replica_id_in_sync_group
        share = shares[replica]
        results, failures = compute(share) if share else ({}, 0)
        pieces = [
            packing.to_words(tf.cast(tensor, dtype))
            for item in share
            for tensor, (_, dtype) in zip(results[item], specs[item])
        ]
        pieces.append(tf.zeros([length - 1 - used[replica]], tf.int32))
        pieces.append(tf.reshape(tf.cast(failures, tf.int32), [1]))
        return tf.concat(pieces, axis=0)

    per_replica = from_local_replicas(strategy, share_buffer)
    gathered = tf.reshape(strategy.gather(per_replica, axis=0), [-1, length])
    results = {}
    for replica, share in enumerate(shares):
        offset = 0
        for item in share:
            tensors = []
            for (shape, dtype), count in zip(specs[item], words[item]):
                flat = gathered[replica, offset : offset + count]
                tensors.append(packing.from_words(flat, shape, dtype))
                offset += count
            results[item] = tuple(tensors)
    return results, tf.reduce_sum(gathered[:, -1])
