"""Optimizer state that differs between replicas, and the replicas of a variable.

Error-feedback memories and Signum momenta hold one value per replica. TF's
sync-on-read variables do that, but a checkpoint of one stores the sum over
replicas; ``ReplicaLocalVariable`` stores every replica's own value instead
and restores it. ``save_per_replica`` / ``split_per_replica`` do the same for
Keras's ``.keras`` / ``.weights.h5`` files, which go through the optimizer's
``save_own_variables`` / ``load_own_variables``.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf


def component_values(variable):
    """The per-device tf.Variables behind a (mirrored) variable, local replicas."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return tuple(getattr(value, "values", None) or (value,))


def first_local_replica(strategy, local_count):
    """Global index of this worker's first replica (workers hold equal counts)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = getattr(resolver, "task_id", None) or 0
    return task_id * local_count


def from_local_replicas(strategy, make):
    """A per-replica value whose k-th local replica holds `make(k, context)`,
    built on that replica's device (cross-replica context; `context` is the
    replica's `ValueContext`, whose `replica_id_in_sync_group` is global)."""
    devices = strategy.extended.worker_devices
    position = iter(range(len(devices)))

    def local_value(context):
        k = next(position)
        with tf.device(devices[k]):
            return make(k, context)

    return strategy.experimental_distribute_values_from_function(local_value)


def is_mirrored(variable):
    """False for sync-on-read variables (per-replica state and counters)."""
    value = getattr(variable, "value", variable)
    sync = getattr(value, "synchronization", None)
    return sync != tf.VariableSynchronization.ON_READ


def replica_values(variable):
    """[local replicas, *shape] NumPy array of a variable's replicas."""
    return np.stack([np.asarray(c.numpy()) for c in component_values(variable)])


def assign_replica_values(variable, stacked):
    """Gives each local replica its row of `stacked` ([replicas, *shape], or
    one value for all). Saved for another replica count, every replica gets
    the mean (or, under several workers, this worker's rows)."""
    components = component_values(variable)
    rows = tf.convert_to_tensor(stacked, dtype=variable.dtype)
    value = variable.value if isinstance(variable, keras.Variable) else variable
    strategy = getattr(value, "distribute_strategy", None)
    total = strategy.num_replicas_in_sync if strategy is not None else 1
    if rows.shape.rank == len(variable.shape):
        rows = tf.stack([rows] * len(components))
    elif rows.shape[0] == total and total != len(components):
        start = first_local_replica(strategy, len(components))
        rows = rows[start : start + len(components)]
    elif rows.shape[0] != len(components):
        warnings.warn(
            f"{variable.path}: saved for {rows.shape[0]} replicas, restored on "
            f"{len(components)}; every replica gets the mean.",
            stacklevel=2,
        )
        rows = tf.stack([tf.reduce_mean(rows, axis=0)] * len(components))
    return tf.group([c.assign(rows[i]) for i, c in enumerate(components)])


class ReplicaLocalVariable(keras.Variable):
    """A keras.Variable with one value per replica, saved per replica.

    Read and assigned in replica context, each replica sees its own value;
    read in cross-replica context it is the sum. Checkpoints and `.keras`
    files hold the values of the local replicas stacked on a new first axis.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, synchronization="on_read", aggregation="sum", **kwargs)

    def replica_values(self):
        return replica_values(self)

    def assign_replica_values(self, stacked):
        return assign_replica_values(self, stacked)

    def _serialize_to_tensors(self):
        stacked = tf.stack([tf.convert_to_tensor(c) for c in component_values(self)])
        return {"VARIABLE_VALUE": stacked}

    def _restore_from_tensors(self, restored_tensors):
        return assign_replica_values(self, restored_tensors["VARIABLE_VALUE"])


def add_variable(optimizer, shape, dtype, name, initializer="zeros", per_replica=True):
    """Adds a sync-on-read variable to `optimizer`'s state.

    `per_replica=True` gives a ReplicaLocalVariable (values differ between
    replicas and are saved per replica); False gives a variable whose
    replicas hold equal values, assigned in replica context without a
    merge_call, saved as replica 0's (counters).
    """
    if isinstance(initializer, str):
        initializer = keras.initializers.get(initializer)
    with optimizer._distribution_strategy.scope():
        with keras.name_scope(optimizer.name, caller=optimizer):
            if per_replica:
                variable = ReplicaLocalVariable(
                    initializer=initializer,
                    shape=shape,
                    dtype=dtype,
                    trainable=False,
                    name=name,
                )
            else:
                variable = keras.Variable(
                    initializer=initializer,
                    shape=shape,
                    dtype=dtype,
                    trainable=False,
                    name=name,
                    synchronization="on_read",
                    aggregation="only_first_replica",
                )
    optimizer._track_variable(variable)
    return variable


def save_per_replica(variables, store, per_replica=()):
    """Keras's `save_own_variables` loop, with per-replica state (and the
    variables in `per_replica`, whose replicas may differ) stored per replica."""
    ids = {id(v) for v in per_replica}
    for i, variable in enumerate(variables):
        if isinstance(variable, ReplicaLocalVariable) or id(variable) in ids:
            store[str(i)] = replica_values(variable)
        else:
            store[str(i)] = variable.numpy()


def split_per_replica(variables, store):
    """(what Keras's `load_own_variables` can load, per-replica values by key):
    a stored value with one more axis than its variable is per replica."""
    per_replica, plain = {}, {}
    for key in store.keys():
        index = int(key)
        variable = variables[index] if index < len(variables) else None
        value = store[key]
        if variable is not None and (
            isinstance(variable, ReplicaLocalVariable)
            or len(value.shape) == len(variable.shape) + 1
        ):
            per_replica[key] = value
            plain[key] = np.zeros(variable.shape, variable.dtype)
        else:
            plain[key] = value
    return plain, per_replica
