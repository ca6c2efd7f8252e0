"""Every use of Keras/TensorFlow private API in tf_secondorder lives here.

Keras 3.15's TensorFlow optimizer (``keras/src/backend/tensorflow/optimizer.py``)
runs one optimizer step as::

    apply()                       # replica context: loss scale, clip, decay
      _backend_update_step()
        _all_reduce_sum_gradients()         # replica context: the collective
        merge_call(_distributed_tf_update_step)  # cross-replica context
          extended.update(var, update_step) for each variable

``StepHooks`` overrides both private methods to give optimizers extension
points in their own terms:

- ``reduce_gradients(grads_and_vars)``: replica context, replaces Keras's
  all-reduce SUM (the loss is pre-scaled by 1/N, so the sum is the mean).
  ``Communication`` compresses here.
- ``apply_update(distribution, grads_and_vars, learning_rate)``: the whole
  update of a step, once, in cross-replica context. Shampoo uses it to guard
  the step against non-finite gradients, update all statistics and refresh
  all roots before the per-variable updates.

Per-replica optimizer state (error-feedback memory, Signum momentum) lives in
``ReplicaLocalVariable``: a sync-on-read variable that TF would save as the
sum over replicas; it saves and restores every replica's own value instead.

If a Keras upgrade renames or stops calling a hooked method, the tests in
``tests/distribute/test_keras_hooks.py`` fail: ``HOOK_CALLS`` counts calls.
"""

import collections
import warnings

import keras
import numpy as np
import tensorflow as tf

# Trace-time call counts, by hook name; read by the tests.
HOOK_CALLS = collections.Counter()

_HOOKED_METHODS = ("_distributed_tf_update_step", "_all_reduce_sum_gradients")


def keras_has_hook_points():
    """True if the installed Keras still has the methods these hooks override."""
    base = keras.optimizers.Optimizer
    return all(callable(getattr(base, m, None)) for m in _HOOKED_METHODS)


class StepHooks:
    """Mixin for ``keras.optimizers.Optimizer`` subclasses (TensorFlow backend).

    ``apply_update`` is the whole update of one step in cross-replica context,
    after the gradients are reduced; by default it is Keras's per-variable
    loop (``update_variables``), which subclasses wrap with work that spans
    all variables.
    """

    def reduce_gradients(self, grads_and_vars):
        """Sums gradients over replicas (replica context); Keras's all-reduce."""
        return super()._all_reduce_sum_gradients(grads_and_vars)

    def apply_update(self, distribution, grads_and_vars, learning_rate):
        self.update_variables(distribution, grads_and_vars, learning_rate)

    def update_variables(self, distribution, grads_and_vars, learning_rate):
        """Keras's loop: ``update_step`` for each variable, on each replica."""
        return super()._distributed_tf_update_step(
            distribution, grads_and_vars, learning_rate
        )

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        HOOK_CALLS["update"] += 1
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        return self.apply_update(distribution, grads_and_vars, learning_rate)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        HOOK_CALLS["reduce"] += 1
        return self.reduce_gradients(grads_and_vars)


def optimizer_strategy(optimizer):
    """The tf.distribute strategy the optimizer was created under."""
    return optimizer._distribution_strategy


def _components(variable):
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return tuple(getattr(value, "values", None) or (value,))


def _first_local_replica(strategy, local_count):
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = getattr(resolver, "task_id", None) or 0
    return task_id * local_count


class ReplicaLocalVariable(keras.Variable):
    """A keras.Variable with one value per replica, saved per replica.

    Read and assigned in replica context, each replica sees its own value;
    read in cross-replica context it is the sum. Checkpoints and `.keras`
    files hold the values of the local replicas stacked on a new first axis;
    restoring with a different replica count gives every replica the mean.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, synchronization="on_read", aggregation="sum", **kwargs)

    def replica_values(self):
        """[local replicas, *shape] NumPy array."""
        return np.stack([np.asarray(c.numpy()) for c in _components(self)])

    def _stacked(self):
        return tf.stack([tf.convert_to_tensor(c) for c in _components(self)])

    def assign_replica_values(self, stacked):
        components = _components(self)
        rows = tf.convert_to_tensor(stacked, dtype=self.dtype)
        strategy = getattr(self.value, "distribute_strategy", None)
        total = strategy.num_replicas_in_sync if strategy is not None else 1
        if rows.shape.rank == len(self.shape):
            rows = tf.stack([rows] * len(components))
        elif rows.shape[0] == total and total != len(components):
            start = _first_local_replica(strategy, len(components))
            rows = rows[start : start + len(components)]
        elif rows.shape[0] != len(components):
            warnings.warn(
                f"{self.path}: saved for {rows.shape[0]} replicas, restored on "
                f"{len(components)}; every replica gets the mean.",
                stacklevel=2,
            )
            rows = tf.stack([tf.reduce_mean(rows, axis=0)] * len(components))
        return tf.group([c.assign(rows[i]) for i, c in enumerate(components)])

    def _serialize_to_tensors(self):
        return {"VARIABLE_VALUE": self._stacked()}

    def _restore_from_tensors(self, restored_tensors):
        return self.assign_replica_values(restored_tensors["VARIABLE_VALUE"])


def add_replica_local_variable(
    optimizer, shape, dtype, name, initializer="zeros", per_replica=True
):
    """Adds a per-replica variable to `optimizer`'s state.

    `per_replica=True` gives a ReplicaLocalVariable (values differ between
    replicas and are saved per replica); False gives a sync-on-read variable
    whose replicas hold equal values and which saves replica 0's (counters
    updated in replica context without a merge_call).
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
