"""The seed a compressor draws its random numbers from, for one tensor of one
replica in one step.

Every aggregator and the compressed local-SGD average derive it here, so a
replica decoding another's code (a gather, the bidirectional and Artemis servers) finds
the seed that replica encoded with.
"""

import tensorflow as tf


def replica_seed(key, step, replica=None, num_replicas=1):
    """int64 [key, stream], stream = step·N + replica: a stream per replica
    and step. `replica=None`: stream = step, the same on every replica (a
    compressor whose replicas must draw alike, `shared_randomness`)."""
    step = tf.cast(step, tf.int64)
    if replica is None:
        stream = step
    else:
        stream = step * num_replicas + tf.cast(replica, tf.int64)
    return tf.stack([tf.cast(key, tf.int64), stream])


def channel_seed(compressor, channel, key, step):
    """`replica_seed` of this replica in a step's `Channel`, shared when the
    compressor needs every replica to draw alike."""
    if getattr(compressor, "shared_randomness", False):
        return replica_seed(key, step)
    replica = channel.context.replica_id_in_sync_group
    return replica_seed(key, step, replica, channel.num_replicas)
