"""Model averaging: local SGD / parallel restarted SGD (SPEC §4.5).

With `average_every=I` and `average_warmup_steps=W`, under a strategy with
N > 1 replicas, step t (0-based) of replica i is

    t <  W:  x_i ← update(x_i, (1/N) Σ_j g_j)      # synchronous (post-local SGD)
    t >= W:  x_i ← update(x_i, g_i)                 # its own gradient, no collective
             if (t + 1 − W) mod I = 0:  x_i ← (1/N) Σ_j x_j   # one all-reduce

so after the warm-up the rounds of communication fall I-fold. The average
covers the model's trainable weights and the optimizer's floating-point
state (moments, Shampoo statistics and roots, EMA weights): after an average
every replica holds the same whole state, which is what makes a checkpoint
written then resume exactly. Averaging the slots was also the better choice
on T1 (docs/benchmarks.md, "Local SGD").

Weights read outside training must be the average. `SyncReplicas`
(tf_secondorder.callbacks), which `fit`, `evaluate` and `predict` get
automatically (see `_keras_hooks.install_callback_injection`), averages
whenever the replicas differ before evaluation, prediction, the end of each
epoch (checkpoints, BackupAndRestore), batch-frequency checkpoints and the end
of `fit`. A custom `strategy.run` loop calls `optimizer.average_replicas()`
before it saves or exports.
"""

import numbers

import tensorflow as tf

from tf_secondorder.distribute._keras_hooks import (
    component_values,
    install_callback_injection,
    optimizer_strategy,
    optimizer_trainable_variables,
)


def validate(average_every, average_warmup_steps):
    if average_every is not None:
        if (
            isinstance(average_every, bool)
            or not isinstance(average_every, numbers.Integral)
            or average_every < 1
        ):
            raise ValueError(
                "`average_every` must be None or an integer >= 1. "
                f"Received: average_every={average_every!r}"
            )
        average_every = int(average_every)
    if (
        isinstance(average_warmup_steps, bool)
        or not isinstance(average_warmup_steps, numbers.Integral)
        or average_warmup_steps < 0
    ):
        raise ValueError(
            "`average_warmup_steps` must be an integer >= 0. "
            f"Received: average_warmup_steps={average_warmup_steps!r}"
        )
    if average_every is None and average_warmup_steps:
        raise ValueError(
            "`average_warmup_steps` needs `average_every` (local SGD). "
            f"Received: average_warmup_steps={average_warmup_steps!r}, "
            "average_every=None"
        )
    return average_every, int(average_warmup_steps)


class ModelAveraging:
    """Mixin part of `Communication`: the local-SGD schedule and the average."""

    # Whether an average covers the optimizer's state too (the documented
    # choice). False averages only the model's weights; it exists for the
    # measurement in tools/local_sgd_benchmark.py, and a checkpoint then holds
    # replica 0's state, so resuming is not exact.
    average_optimizer_state = True

    def _init_averaging(self, average_every, average_warmup_steps):
        self.average_every, self.average_warmup_steps = validate(
            average_every, average_warmup_steps
        )
        if self.average_every is not None:
            install_callback_injection()

    def build_averaging(self):
        self._steps_since_average = None
        if self.average_every is None:
            return
        self._steps_since_average = self.add_variable(
            (),
            initializer="zeros",
            dtype="int32",
            name="steps_since_average",
            aggregation="only_first_replica",
        )

    def averages_locally(self, distribution=None):
        """True when replicas step on their own gradients (local SGD is on)."""
        if self.average_every is None:
            return False
        distribution = distribution or optimizer_strategy(self)
        return distribution is not None and distribution.num_replicas_in_sync > 1

    def local_step_gradients(self, grads_and_vars, num_replicas):
        """Replica context: each replica's own gradient, no collective."""
        out = []
        for g, v in grads_and_vars:
            if g is None:
                out.append((g, v))
                continue
            dense = tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
            own = tf.cast(dense, tf.float32) * num_replicas
            out.append((tf.cast(self.local_gradient(own, v), g.dtype), v))
        return out

    def step_update(self, distribution, grads_and_vars, learning_rate):
        if not self.averages_locally(distribution):
            return self.apply_update(distribution, grads_and_vars, learning_rate)
        step = tf.cast(self.iterations, tf.int32)
        warmup = self.average_warmup_steps

        def local():
            self.apply_update(distribution, grads_and_vars, learning_rate)
            self._steps_since_average.assign_add(1)

        if warmup:

            def synchronous():
                reduced = distribution.extended.batch_reduce_to(
                    tf.distribute.ReduceOp.MEAN, grads_and_vars
                )
                variables = [v for _, v in grads_and_vars]
                self.apply_update(
                    distribution, list(zip(reduced, variables)), learning_rate
                )
                self._count_from_cross_replica(1, sum(_nbytes(v) for v in variables))

            tf.cond(step < warmup, synchronous, local)
        else:
            local()
        due = (step >= warmup) & ((step + 1 - warmup) % self.average_every == 0)
        tf.cond(due, lambda: self._average(distribution), _no_op)

    def averaged_variables(self):
        """The variables an average replaces: model weights and float slots."""
        excluded = {id(self.iterations)}
        lr = getattr(self, "_learning_rate", None)
        if isinstance(lr, tf.Variable) or hasattr(lr, "value"):
            excluded.add(id(lr))
        slots = [
            v
            for v in self.variables
            if id(v) not in excluded
            and v.dtype in ("float16", "bfloat16", "float32", "float64")
            and _is_mirrored(v)
        ]
        if not self.average_optimizer_state:
            slots = []
        return list(optimizer_trainable_variables(self)) + slots

    def _average(self, distribution):
        rounds, nbytes = average_across_replicas(
            distribution, self.averaged_variables()
        )
        self._steps_since_average.assign(0)
        self._count_from_cross_replica(rounds, nbytes)

    def replicas_differ(self):
        """Whether local steps ran since the last average."""
        if not self.built or not self.averages_locally():
            return False
        return int(self._steps_since_average.numpy()) > 0

    def average_replicas(self, force=False):
        """Averages weights and slots over replicas now (outside `tf.function`).

        Does nothing when the replicas are already equal (unless `force`) or
        local SGD is off. Every worker of a multi-worker job must call it at
        the same point: it is a collective.
        """
        if not self.built or not self.averages_locally():
            return False
        if not force and not self.replicas_differ():
            return False
        function = self.__dict__.get("_tfso_average_function")
        distribution = optimizer_strategy(self)
        if function is None:
            function = tf.function(lambda: self._average(distribution))
            self.__dict__["_tfso_average_function"] = function
        with distribution.scope():
            function()
        return True


def average_across_replicas(distribution, variables):
    """Replaces each mirrored variable's replicas by their mean (cross-replica
    context). One all-reduce per dtype; returns (rounds, bytes per replica)."""
    by_dtype = {}
    for variable in variables:
        by_dtype.setdefault(variable.dtype, []).append(variable)
    rounds, nbytes = 0, 0
    for group in by_dtype.values():
        components = [component_values(v) for v in group]
        sizes = [int(v.shape.num_elements()) for v in group]
        position = iter(range(len(components[0])))

        def local_buffer(context, components=components, position=position):
            k = next(position)
            with tf.device(components[0][k].device):
                return tf.concat([tf.reshape(c[k], [-1]) for c in components], 0)

        per_replica = distribution.experimental_distribute_values_from_function(
            local_buffer
        )
        mean = distribution.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)
        for variable, piece in zip(group, tf.split(mean, sizes)):
            variable.assign(tf.reshape(piece, variable.shape))
        rounds += 1
        nbytes += sum(sizes) * tf.as_dtype(group[0].dtype).size
    return rounds, nbytes


def _is_mirrored(variable):
    value = getattr(variable, "value", variable)
    sync = getattr(value, "synchronization", None)
    return sync != tf.VariableSynchronization.ON_READ


def _nbytes(variable):
    return int(variable.shape.num_elements()) * tf.as_dtype(variable.dtype).size


def _no_op():
    return None
