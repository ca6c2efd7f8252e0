"""Independent pieces of work split across replicas and exchanged (SPEC §3.4).

Every replica of a data-parallel strategy holds the same optimizer statistics,
so computing every inverse root (or eigenbasis) on every replica wastes N−1 of
N. `run_sharded` runs each replica's share on that replica's device and
all-gathers the results, so each replica ends up with all of them.

Called in cross-replica context (Keras's `apply`, after `merge_call`), so a
`tf.cond` around it holds no replica-context collective (SPEC §5): the gather
is issued from cross-replica code, by every worker for the same steps.
"""

import numpy as np
import tensorflow as tf


def splits_work(distribution, mode):
    """Whether `mode` ("auto", True, False) splits work under `distribution`.

    "auto" is on for MirroredStrategy and MultiWorkerMirroredStrategy with more
    than one replica. Other strategies (TPUStrategy, ParameterServer...) run
    the unsplit computation: their cross-replica code cannot place work on
    one replica's core.
    """
    if mode is False or distribution is None:
        return False
    if distribution.num_replicas_in_sync < 2:
        return False
    return isinstance(
        distribution,
        (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy),
    )


def run_sharded(distribution, shares, shapes, compute, dtype):
    """Runs `compute(shares[r])` on replica r and gives every replica all results.

    Args:
        distribution: a MirroredStrategy or MultiWorkerMirroredStrategy; must
            be called in its cross-replica context.
        shares: one list of item ids per replica (from `greedy_partition`).
        shapes: static shape of each item's result, by item id.
        compute: function(list of item ids) -> (list of tensors, one per
            item, of those shapes; a scalar count of failures).
        dtype: the exchange dtype; results are cast to it and back, so it must
            hold every result exactly (the widest result dtype).

    Returns:
        (dict item id -> tensor of `dtype`, total failures as float `dtype`).
    """
    dtype = tf.as_dtype(dtype)
    sizes = {item: int(np.prod(shape)) for item, shape in shapes.items()}
    # One flat buffer per replica, the failure count last, padded to a common
    # length: all_gather of equal shapes is what every collective supports.
    length = max(sum(sizes[i] for i in share) for share in shares) + 1
    devices = distribution.extended.worker_devices
    local = iter(range(len(devices)))

    def share_buffer(context):
        share = shares[context.replica_id_in_sync_group]
        with tf.device(devices[next(local)]):
            values, failures = compute(share) if share else ([], 0)
            pieces = [tf.reshape(tf.cast(v, dtype), [-1]) for v in values]
            used = sum(sizes[i] for i in share)
            pieces.append(tf.zeros([length - 1 - used], dtype))
            pieces.append(tf.reshape(tf.cast(failures, dtype), [1]))
            return tf.concat(pieces, axis=0)

    per_replica = distribution.experimental_distribute_values_from_function(
        share_buffer
    )
    gathered = tf.reshape(distribution.gather(per_replica, axis=0), [-1, length])
    results = {}
    for replica, share in enumerate(shares):
        offset = 0
        for item in share:
            flat = gathered[replica, offset : offset + sizes[item]]
            results[item] = tf.reshape(flat, shapes[item])
            offset += sizes[item]
    return results, tf.reduce_sum(gathered[:, -1])
