"""One optimizer step's dealings with the other replicas, in one place.

An optimizer holds a `Communicator` built from its `CommunicationConfig` and
calls it twice per step:

``reduce(...)``, replica context, instead of Keras's all-reduce SUM. Keras
hands each replica g_i/N (the loss is pre-scaled), so with x_i = N·(g_i/N):

    x_i ← transform(x_i)            # the optimizer's own, e.g. Signum momentum
    no strategy:   ĝ = x_1          # the same script trains unchanged alone
    local SGD:     ĝ_i = x_i        # no collective; `step` averages later
    no compression: ĝ = Keras's all-reduce of x_i / N
    otherwise:     ĝ = aggregator(x_i)   # error feedback ∘ aggregator ∘ compressor
                   (during `compression_warmup_steps`: ĝ_i = x_i, all-reduced
                   in full precision by `step`)

``step(...)``, cross-replica context, once per step, in this order:

    1. a step whose reduced gradient is not finite is skipped whole and
       counted (weights, weight decay, slots, memories, EMA; only
       `iterations` advances, so schedules and workers stay in step);
    2. saddle escape: the gradient norm, before the update;
    3. the update (`update(grads_and_vars)`: weight decay, then the
       optimizer's own), inside local SGD's schedule when it is on, after a
       full-precision all-reduce during the compression warm-up;
    4. saddle escape: the perturbation when due.
"""

import numpy as np
import tensorflow as tf

from tf_secondorder.distribute import aggregators
from tf_secondorder.distribute.artemis import Artemis
from tf_secondorder.distribute.bidirectional import Bidirectional
from tf_secondorder.distribute.channel import Channel
from tf_secondorder.distribute.error_feedback import ErrorFeedback
from tf_secondorder.distribute.local_sgd import LocalSGD
from tf_secondorder.distribute.saddle import SaddlePerturbation
from tf_secondorder.distribute.voting import MajorityVote


def make_aggregator(config):
    """The aggregator for `config` (None: Keras's own all-reduce), error
    feedback wrapped around it when on. A compressor with an aggregator of
    its own (`aggregators.serves`, e.g. PowerSGD's) gets that one; the
    config has checked that `aggregation` is one it accepts."""
    compressor = config.compression
    if compressor is None:
        return None
    own = aggregators.served_by(compressor)
    if own is not None:
        aggregator = own(compressor)
    elif config.aggregation == "artemis":
        aggregator = Artemis(compressor, config.memory_rate, config.participation)
    elif config.aggregation == "bidirectional":
        aggregator = Bidirectional(compressor, server_memory=config.uses_error_feedback)
    elif config.aggregation == "majority_vote":
        aggregator = MajorityVote(compressor)
    elif compressor.summable:
        aggregator = aggregators.AllReduceMean(compressor)
    else:
        aggregator = aggregators.GatherMean(compressor)
    return ErrorFeedback(aggregator) if config.uses_error_feedback else aggregator


class Counters:
    """Bytes and rounds of this replica, and the steps skipped.

    `rounds`, `bytes_total`, `step_bytes` are sync-on-read variables whose
    replicas hold equal values: the replica-context reduction assigns them
    without a merge_call. `nonfinite_steps` and `last_skipped_step` are
    assigned in cross-replica context; the EMA update reads the latter to
    know whether this step was skipped.
    """

    def build(self, state):
        self.rounds = state.replica_counter("communication_rounds")
        self.bytes_total = state.replica_counter("communication_bytes")
        self.step_bytes = state.replica_counter("communication_step_bytes")
        self.nonfinite_steps = state.counter("nonfinite_steps", "int64")
        self.last_skipped_step = state.counter(
            "last_skipped_step", "int64", initializer=-1
        )
        # What the collectives of one exchange deliver to a replica (static).
        self.received_per_step = 0

    def add(self, rounds, nbytes):
        """Adds collectives to this step's (cross-replica context)."""
        nbytes = tf.cast(nbytes, tf.int64)
        self.rounds.assign_add(tf.constant(rounds, tf.int64))
        self.bytes_total.assign_add(nbytes)
        self.step_bytes.assign_add(nbytes)

    def record(self, rounds, nbytes):
        """Adds one step's collectives (either context)."""
        nbytes = tf.cast(nbytes, tf.int64)
        return tf.group(
            self.rounds.assign_add(tf.constant(rounds, tf.int64)),
            self.bytes_total.assign_add(nbytes),
            self.step_bytes.assign(nbytes),
        )


class Communicator:
    def __init__(self, config):
        self.config = config
        self.aggregator = make_aggregator(config)
        self.local_sgd = (
            LocalSGD(
                config.average_every,
                config.average_warmup_steps,
                config.outer_optimizer,
                config.average_compression,
            )
            if config.local_sgd
            else None
        )
        self.saddle = (
            SaddlePerturbation(config.saddle_escape)
            if config.saddle_escape is not None
            else None
        )
        self.counters = Counters()
        self.float32_bytes = 0

    def build(self, state, variables, averaged_variables):
        """Creates the state of every piece; `averaged_variables()` lists what
        a local-SGD average replaces."""
        self.counters.build(state)
        self.float32_bytes = 4 * sum(int(np.prod(v.shape)) for v in variables)
        if self.aggregator is not None:
            self.aggregator.build(state, variables)
        if self.local_sgd is not None:
            self.local_sgd.build(state, variables, averaged_variables)
        if self.saddle is not None:
            self.saddle.build(state)

    def averages_locally(self, strategy):
        return self.local_sgd is not None and strategy.num_replicas_in_sync > 1

    # -- replica context -------------------------------------------------------

    def reduce(self, grads_and_vars, keys, step, keras_sum, transform=None):
        """The reduced gradients (replica context).

        Args:
            grads_and_vars: this replica's (gradient, variable) pairs, g_i/N.
            keys: each variable's index in the optimizer (seeds, state).
            step: int64 scalar, the step number.
            keras_sum: Keras's all-reduce SUM of (gradient, variable) pairs.
            transform: None or function(list of x_i, keys) -> (list of what
                to send, [(state variable, new value)]) run on each replica's
                own gradients; its state advances only on finite steps.
        """
        context = tf.distribute.get_replica_context()
        n = context.num_replicas_in_sync
        if n == 1 and transform is None:
            return grads_and_vars
        if self.aggregator is None and transform is None and self.local_sgd is None:
            return self._keras_sum(keras_sum, grads_and_vars)
        present = [i for i, (g, _) in enumerate(grads_and_vars) if g is not None]
        # The variable's static shape: a gradient's can be unknown (a table
        # sliced to a variable sequence length) and compressors size by it.
        own = [
            tf.ensure_shape(_dense_float32(grads_and_vars[i][0]), var.shape) * n
            for i, var in ((i, grads_and_vars[i][1]) for i in present)
        ]
        own_keys = [keys[i] for i in present]
        local_finite = _all_finite(own)
        state_updates = []
        if transform is not None:
            own, state_updates = transform(own, own_keys)
        updates = []
        if n == 1 or self.local_sgd is not None:
            reduced, all_finite = own, local_finite
            if n > 1:
                self.counters.step_bytes.assign(tf.constant(0, tf.int64))
        elif self.aggregator is None:
            scaled = [(x / n, grads_and_vars[i][1]) for x, i in zip(own, present)]
            reduced = [g for g, _ in self._keras_sum(keras_sum, scaled)]
            all_finite = _all_finite(reduced)
        else:
            warmup = self.config.compression_warmup_steps
            one_based = tf.cast(step, tf.int32) + 1
            active = (
                tf.logical_not(self.config.full_precision_step(one_based))
                if warmup
                else None
            )
            channel = Channel(context, local_finite, active)
            reduced, _ = self.aggregator.reduce(channel, own, own_keys, step)
            all_finite = (
                local_finite if channel.all_finite is None else channel.all_finite
            )
            updates = channel.updates
            self.counters.received_per_step = channel.received
            updates.append(self.counters.record(channel.rounds, channel.bytes))
            if warmup:
                # Each replica's own gradient: `step` all-reduces it.
                reduced = [tf.where(active, r, x) for r, x in zip(reduced, own)]
            # Every replica skips the step: the guard in `step` sees NaN.
            poison = tf.where(all_finite, 0.0, float("nan"))
            reduced = [r + poison for r in reduced]
        for variable, value in state_updates:
            updates.append(variable.assign(tf.where(all_finite, value, variable)))
        out = list(grads_and_vars)
        with tf.control_dependencies(updates):
            for i, r in zip(present, reduced):
                gradient, variable = grads_and_vars[i]
                out[i] = (tf.cast(tf.identity(r), gradient.dtype), variable)
        return out

    def _keras_sum(self, keras_sum, grads_and_vars):
        """Keras's own all-reduce SUM (one collective call), counted."""
        nbytes = tf.constant(0, tf.int64)
        dense = 0
        for g, v in grads_and_vars:
            if isinstance(g, tf.IndexedSlices):
                nbytes += tf.size(g.values, tf.int64) * g.values.dtype.size
                nbytes += tf.size(g.indices, tf.int64) * g.indices.dtype.size
            elif g is not None:
                # The variable's shape: a gradient's static shape can be
                # unknown (a table sliced to a variable sequence length).
                dense += int(np.prod(v.shape)) * g.dtype.size
        summed = keras_sum(grads_and_vars)
        # An all-reduce delivers what it is handed (sparse parts: varies).
        self.counters.received_per_step = dense
        self.counters.record(1, nbytes + dense)
        return summed

    # -- cross-replica context -------------------------------------------------

    def step(self, strategy, grads_and_vars, update, iterations):
        """Runs the step's pieces in the order of the module docstring."""
        step = tf.cast(iterations, tf.int32) + 1
        local = self.averages_locally(strategy)
        warmup = self.config.compression_warmup_steps
        # Reduced gradients are equal on every replica; local-SGD ones (and
        # those of the compression warm-up) are not, and one replica's NaN
        # stops the step of every local replica.
        replicas = slice(None) if local or warmup else slice(1)
        finite = _all_finite(
            [
                _dense(value)
                for grad, _ in grads_and_vars
                for value in strategy.experimental_local_results(grad)[replicas]
            ]
        )

        def run():
            norm = None
            if self.saddle is not None:
                norm = self.saddle.gradient_norm(strategy, grads_and_vars)
            if local:
                self.local_sgd.step(
                    strategy, grads_and_vars, update, step, self.counters
                )
            elif warmup and strategy.num_replicas_in_sync > 1:
                tf.cond(
                    self.config.full_precision_step(step),
                    lambda: self._full_precision(strategy, grads_and_vars, update),
                    lambda: update(grads_and_vars),
                )
            else:
                update(grads_and_vars)
            if self.saddle is not None:
                variables = [v for _, v in grads_and_vars]
                self.saddle.perturb_if_due(variables, norm, step)

        def skip():
            self.counters.nonfinite_steps.assign_add(1)
            self.counters.last_skipped_step.assign(tf.cast(iterations, tf.int64))

        tf.cond(finite, run, skip)

    def _full_precision(self, strategy, grads_and_vars, update):
        """The compression warm-up: one float32 all-reduce of each replica's
        own gradient, then the update."""
        reduced = strategy.extended.batch_reduce_to(
            tf.distribute.ReduceOp.MEAN, grads_and_vars
        )
        self.counters.add(1, self.float32_bytes)
        update(list(zip(reduced, [v for _, v in grads_and_vars])))

    def step_was_skipped(self, iterations):
        """Whether the step at `iterations` was skipped (read after `step`)."""
        return tf.equal(
            tf.convert_to_tensor(self.counters.last_skipped_step),
            tf.cast(iterations, tf.int64),
        )

    # -- outside tf.function ----------------------------------------------------

    def stats(self):
        counters = self.counters
        return {
            "bytes_per_step": int(counters.step_bytes.numpy()),
            "rounds": int(counters.rounds.numpy()),
            "bytes_total": int(counters.bytes_total.numpy()),
            "float32_bytes_per_step": self.float32_bytes,
            "bytes_received_per_step": counters.received_per_step,
        }


def _dense(gradient):
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def _dense_float32(gradient):
    return tf.cast(_dense(gradient), tf.float32)


def _all_finite(tensors):
    if not tensors:
        return tf.constant(True)
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])
