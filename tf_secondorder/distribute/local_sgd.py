"""Model averaging: local SGD / parallel restarted SGD, and DiLoCo.

With `average_every=I` and `average_warmup_steps=W`, under a strategy with
N > 1 replicas, step t (0-based) of replica i is

    t <  W:  x_i ← update(x_i, (1/N) Σ_j g_j)      # synchronous (post-local SGD)
    t >= W:  x_i ← update(x_i, g_i)                 # its own gradient, no collective
             if (t + 1 − W) mod I = 0:  average     # one collective per I steps

so after the warm-up the rounds of communication fall I-fold
(Stich 2018; Yu, Yang, Zhu 2019; Lin et al. 2018).

**Plain averaging** (no outer optimizer, no compression): x_i ← (1/N) Σ_j x_j
for the model's trainable weights and the optimizer's floating-point state
that is the same kind of thing on every replica (moments, Shampoo statistics
and roots, EMA weights): after an average every replica holds the same
state, so a checkpoint written then resumes exactly. Averaging the slots was
also the better choice when measured (docs/benchmarks.md, "Local SGD every
I steps").
State only meaningful on the replica that made it is left alone: an
optimizer lists it in `replica_specific_variables()` (SOAP's eigenbases and
the second moments kept in them).

**DiLoCo** (Douillard et al. 2023; `outer_optimizer`) and compressed
averaging (`average_compression`): an anchor x₀ holds the weights of the
last average. Each replica's pseudo-gradient Δ_i = x₀ − x_i (plus its
error-feedback memory e_i, when compressed) is encoded, the codes are
gathered, and with Δ = (1/N) Σ_i decode(C(Δ_i + e_i)):

    x₀ ← outer_step(x₀, Δ)      (no outer optimizer: x₀ ← x₀ − Δ, the mean)
    x_i ← x₀ for every replica; e_i ← Δ_i + e_i − decode(C(Δ_i + e_i))

Only the weights' pseudo-gradients travel: each replica's inner optimizer
state stays its own (as in the paper), and is saved per replica by Keras
saving (`.keras`, `.weights.h5`, BackupAndRestore).

Weights read outside training must be the average: `SyncReplicas`
(tf_secondorder.callbacks), which `fit`, `evaluate` and `predict` get
automatically, calls `average_now` before evaluation, prediction, the end of
each epoch, batch-frequency checkpoints and the end of `fit` (with DiLoCo:
an outer step there). A custom `strategy.run` loop calls
`optimizer.average_replicas()` before it saves.
"""

import tensorflow as tf

from tf_secondorder.compat import optimizer_step
from tf_secondorder.compat.replica_state import (
    component_values,
    first_local_replica,
    from_local_replicas,
)
from tf_secondorder.compression import packing
from tf_secondorder.distribute.error_feedback import compensate
from tf_secondorder.distribute.seeds import replica_seed


class LocalSGD:
    """The local-SGD schedule and the average (cross-replica context).

    State: `steps_since_average`, the local steps since the last average
    (saved, so a resumed run knows whether its replicas differ); with an
    anchor, the anchor weights, the outer optimizer's slots and the
    per-replica pseudo-gradient memories.
    """

    def __init__(self, every, warmup_steps, outer_optimizer=None, compressor=None):
        self.every = every
        self.warmup_steps = warmup_steps
        self.outer_optimizer = outer_optimizer
        self.compressor = compressor
        self.anchored = outer_optimizer is not None or compressor is not None
        self.steps_since_average = None
        self.anchors = []
        self.memories = []
        self._averaged = None
        self._weights = []
        self._eager_average = None

    def build(self, state, weights, averaged_variables):
        """`weights`: the model's trainable variables; `averaged_variables()`:
        what a plain average replaces."""
        self.steps_since_average = state.counter("steps_since_average", "int32")
        self._averaged = averaged_variables
        self._weights = list(weights)
        if not self.anchored:
            return
        self.anchors = [state.mirrored_copy(w, "anchor") for w in self._weights]
        if self.compressor is not None:
            self.memories = [
                state.per_replica(w, "pseudo_gradient_feedback", tuple(w.shape))
                for w in self._weights
            ]
        if self.outer_optimizer is not None:
            state.build_inner(self.outer_optimizer, self.anchors)

    def step(self, strategy, grads_and_vars, update, step, counters):
        """One step: synchronous during the warm-up, else local, then the
        average when due. `grads_and_vars` hold each replica's own gradient."""
        t = step - 1

        def local():
            update(grads_and_vars)
            self.steps_since_average.assign_add(1)

        if self.warmup_steps:

            def synchronous():
                reduced = strategy.extended.batch_reduce_to(
                    tf.distribute.ReduceOp.MEAN, grads_and_vars
                )
                variables = [v for _, v in grads_and_vars]
                update(list(zip(reduced, variables)))
                if self.anchored:  # the anchor follows the common weights
                    for anchor, weight in zip(self.anchors, self._weights):
                        anchor.assign(weight)
                counters.record(1, sum(_nbytes(v) for v in variables))

            tf.cond(t < self.warmup_steps, synchronous, local)
        else:
            local()
        due = (t >= self.warmup_steps) & ((t + 1 - self.warmup_steps) % self.every == 0)
        tf.cond(due, lambda: self.average(strategy, counters, step), lambda: None)

    def average(self, strategy, counters, step):
        if self.anchored:
            rounds, nbytes = self._outer_step(strategy, step)
        else:
            rounds, nbytes = average_across_replicas(strategy, self._averaged())
        self.steps_since_average.assign(0)
        counters.record(rounds, nbytes)

    def _outer_step(self, strategy, step):
        """The pseudo-gradients' mean, the outer step, every replica to x₀."""
        deltas = [
            [a - w for a, w in zip(component_values(anchor), component_values(weight))]
            for anchor, weight in zip(self.anchors, self._weights)
        ]
        if self.compressor is None:
            mean, rounds, nbytes = _mean_over_replicas(strategy, deltas)
        else:
            mean, rounds, nbytes = self._compressed_mean(strategy, deltas, step)
        if self.outer_optimizer is None:
            for anchor, delta in zip(self.anchors, mean):
                anchor.assign_sub(delta)
        else:
            optimizer_step.apply_in_cross_replica_context(
                self.outer_optimizer, strategy, list(zip(mean, self.anchors))
            )
        for anchor, weight in zip(self.anchors, self._weights):
            weight.assign(anchor)
        return rounds, nbytes

    def _compressed_mean(self, strategy, deltas, step):
        """Each replica encodes Δ_i + e_i on its device (error feedback kept
        per replica); the codes are gathered as int32 words and decoded."""
        compressor = self.compressor
        first = first_local_replica(strategy, len(strategy.extended.worker_devices))
        n = strategy.num_replicas_in_sync
        shapes = [tuple(w.shape) for w in self._weights]
        sizes = []

        def encode(k, context):
            seeds = [replica_seed(i, step, first + k, n) for i in range(len(shapes))]

            def send(values):
                wires = [compressor.encode(v, s) for v, s in zip(values, seeds)]
                return wires, [
                    compressor.decode(w, shape, s)
                    for w, shape, s in zip(wires, shapes, seeds)
                ]

            own = [component_values(memory)[k] for memory in self.memories]
            wires, residuals = compensate(send, [d[k] for d in deltas], own)
            for memory, residual in zip(own, residuals):
                memory.assign(residual)
            words = [packing.to_words(w) for wire in wires for w in wire]
            sizes[:] = [int(w.shape[0]) for w in words]
            return tf.concat(words, 0)

        per_replica = from_local_replicas(strategy, encode)
        gathered = tf.reshape(strategy.gather(per_replica, axis=0), [-1, sum(sizes)])
        specs = [compressor.wire_specs(shape) for shape in shapes]
        total = [tf.zeros(shape) for shape in shapes]
        for r in range(n):
            pieces = iter(tf.split(gathered[r], sizes))
            for i, (shape, spec) in enumerate(zip(shapes, specs)):
                wire = [packing.from_words(next(pieces), s, d) for s, d in spec]
                total[i] += compressor.decode(wire, shape, replica_seed(i, step, r, n))
        mean = [t / n for t in total]
        return mean, 1, sum(sizes) * 4

    def replicas_differ(self):
        """Whether local steps ran since the last average (eager)."""
        return int(self.steps_since_average.numpy()) > 0

    def average_now(self, strategy, counters, iterations):
        """Averages now, outside `tf.function`; a collective, so every worker
        must call it at the same point."""
        if self._eager_average is None:
            self._eager_average = tf.function(
                lambda: self.average(
                    strategy, counters, tf.cast(iterations, tf.int32) + 1
                )
            )
        with strategy.scope():
            self._eager_average()


def _mean_over_replicas(strategy, per_replica_tensors):
    """(1/N) Σ_r of local per-replica tensors (lists by local replica), one
    float32 all-reduce; returns (means, rounds, bytes)."""
    sizes = [int(t[0].shape.num_elements()) for t in per_replica_tensors]

    def local_buffer(k, context):
        return tf.concat([tf.reshape(t[k], [-1]) for t in per_replica_tensors], 0)

    values = from_local_replicas(strategy, local_buffer)
    mean = strategy.reduce(tf.distribute.ReduceOp.MEAN, values, axis=None)
    pieces = tf.split(mean, sizes)
    means = [tf.reshape(p, t[0].shape) for p, t in zip(pieces, per_replica_tensors)]
    return means, 1, 4 * sum(sizes)


def average_across_replicas(strategy, variables):
    """Replaces each mirrored variable's replicas by their mean (cross-replica
    context). One all-reduce per dtype; returns (rounds, bytes per replica)."""
    by_dtype = {}
    for variable in variables:
        by_dtype.setdefault(variable.dtype, []).append(variable)
    rounds, nbytes = 0, 0
    for group in by_dtype.values():
        components = [component_values(v) for v in group]
        sizes = [int(v.shape.num_elements()) for v in group]

        def local_buffer(k, context, components=components):
            return tf.concat([tf.reshape(c[k], [-1]) for c in components], 0)

        per_replica = from_local_replicas(strategy, local_buffer)
        mean = strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)
        for variable, piece in zip(group, tf.split(mean, sizes)):
            variable.assign(tf.reshape(piece, variable.shape))
        rounds += 1
        nbytes += sum(sizes) * tf.as_dtype(group[0].dtype).size
    return rounds, nbytes


def _nbytes(variable):
    return int(variable.shape.num_elements()) * tf.as_dtype(variable.dtype).size
