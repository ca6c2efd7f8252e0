"""A collective tf.distribute does not offer: all_to_all between replicas."""

import tensorflow as tf

from tf_secondorder.compat import testing
from tf_secondorder.compat.replica_state import first_local_replica


def all_to_all(context, tensor):
    """Row j of `tensor` ([replicas, ...]) goes to replica j; row i of the
    result came from replica i. Replica context.

    MirroredStrategy and MultiWorkerMirroredStrategy run their collectives
    through per-device launchers of `CollectiveAllReduce`, whose group and
    instance keys this uses for TensorFlow's CollectiveAllToAllV2 kernel.
    Returns None when the strategy has no such launchers (the caller then
    emulates it with an all_gather).
    """
    from tensorflow.python.ops import collective_ops

    strategy = context.strategy
    launchers = getattr(
        getattr(strategy.extended, "_cross_device_ops", None), "_launchers", None
    )
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    if not launchers or replica is None:
        return None
    launcher = launchers[int(replica) - first_local_replica(strategy, len(launchers))]
    testing.record("all_to_all")
    with tf.device(launcher._device):
        return collective_ops.all_to_all_v2(
            tensor,
            launcher._group_size,
            launcher._group_key,
            launcher._next_instance_key(),
            ordering_token=launcher._get_ordering_token(),
        )
