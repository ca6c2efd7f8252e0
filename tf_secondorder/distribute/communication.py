"""The communication options of every tf_secondorder optimizer (SPEC §2, §4.1–4.3).

`Communication` replaces Keras's cross-replica gradient sum. Per replica i,
with N replicas and g_i the replica's own gradient (Keras hands the hook
g_i/N because the loss is pre-scaled):

    x_i = local_gradient(g_i)                  # identity; Signum: its momentum
    p_i = x_i + e_i                            # e_i: error-feedback memory
    c_i = C(p_i);  e_i ← p_i − decompress(c_i) # kept if p_i is not finite
    mean:           ĝ = (1/N) Σ_i decompress(c_i)
    majority_vote:  ĝ = sign(Σ_i sign(decompress(c_i)))   (sign(0) = +1)

ĝ goes to the optimizer's update as the gradient. With one replica (no
strategy) nothing is compressed or sent and ĝ = x_1, so the same script
trains unchanged on a laptop.
"""

import numpy as np
import tensorflow as tf

from tf_secondorder.distribute import compressors
from tf_secondorder.distribute._keras_hooks import (
    ReplicaLocalVariable,
    StepHooks,
    add_replica_local_variable,
)
from tf_secondorder.distribute.channel import Channel

AGGREGATIONS = ("mean", "majority_vote")


def _slot_name(variable, suffix):
    return f"{variable.path.replace('/', '_')}_{suffix}"


class Communication(StepHooks):
    """Mixin for Keras optimizers: compression, error feedback, majority vote.

    Subclasses call `_init_communication(...)` in `__init__`,
    `build_communication(var_list)` at the end of `build`, and add
    `communication_config()` to `get_config`.
    """

    def _init_communication(
        self, compression=None, error_feedback=None, aggregation="mean"
    ):
        self.compression = compressors.get(compression)
        self._compression_config = (
            compression if isinstance(compression, (str, type(None))) else None
        )
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"`aggregation` must be one of {list(AGGREGATIONS)}. "
                f"Received: aggregation={aggregation!r}"
            )
        if aggregation == "majority_vote" and not getattr(
            self.compression, "sign_based", False
        ):
            raise ValueError(
                "`aggregation='majority_vote'` needs a sign compressor "
                "(compression='sign' or 'scaled_sign'). "
                f"Received: compression={compression!r}"
            )
        if error_feedback not in (None, True, False):
            raise ValueError(
                "`error_feedback` must be None (automatic), True or False. "
                f"Received: error_feedback={error_feedback!r}"
            )
        self.aggregation = aggregation
        self.error_feedback = error_feedback

    @property
    def uses_error_feedback(self):
        """Resolved `error_feedback`: None means on for biased compressors.

        Under majority vote the default is off: the vote is Bernstein et
        al.'s algorithm, which has no memory.
        """
        if self.compression is None:
            return False
        if self.error_feedback is not None:
            return self.error_feedback
        return self.aggregation == "mean" and self.compression.error_feedback_default

    def communication_config(self):
        compression = self._compression_config
        if compression is None and self.compression is not None:
            import keras

            compression = keras.saving.serialize_keras_object(self.compression)
        return {
            "compression": compression,
            "error_feedback": self.error_feedback,
            "aggregation": self.aggregation,
        }

    def build_communication(self, var_list):
        counter = dict(shape=(), dtype="int64", per_replica=False)
        self._communication_rounds = add_replica_local_variable(
            self, name="communication_rounds", **counter
        )
        self._communication_bytes = add_replica_local_variable(
            self, name="communication_bytes", **counter
        )
        self._communication_step_bytes = add_replica_local_variable(
            self, name="communication_step_bytes", **counter
        )
        self._error_memory = [None] * len(var_list)
        self._compressor_state = [[] for _ in var_list]
        self._uncompressed_bytes = 4 * sum(int(np.prod(v.shape)) for v in var_list)
        if self.compression is None:
            return
        for i, variable in enumerate(var_list):
            if self.uses_error_feedback:
                self._error_memory[i] = add_replica_local_variable(
                    self,
                    variable.shape,
                    "float32",
                    _slot_name(variable, "error_feedback"),
                )
            states = self.compression.initial_state(tuple(variable.shape), i)
            self._compressor_state[i] = [
                add_replica_local_variable(
                    self,
                    s.shape,
                    "float32",
                    _slot_name(variable, f"compressor_{j}"),
                    initializer=s,
                )
                for j, s in enumerate(states)
            ]

    # Subclasses that transform the gradient before sending set this True.
    has_local_transform = False

    def local_gradient(self, gradient, variable):
        """A replica's own float32 gradient → what it sends (replica context)."""
        return gradient

    def reduce_gradients(self, grads_and_vars):
        context = tf.distribute.get_replica_context()
        n = context.num_replicas_in_sync
        present = [
            (i, g, v) for i, (g, v) in enumerate(grads_and_vars) if g is not None
        ]
        if self.compression is None and not self.has_local_transform:
            if n == 1:
                return grads_and_vars
            return self._plain_sum(grads_and_vars, present)
        local = [self.local_gradient(_dense_float32(g) * n, v) for _, g, v in present]
        if n == 1:
            reduced = local
        elif self.compression is None:
            scaled = [(x / n, v) for x, (_, _, v) in zip(local, present)]
            reduced = [g for g, _ in self._plain_sum(scaled, present)]
        else:
            reduced = self._compressed_mean(context, present, local)
        out = list(grads_and_vars)
        for (i, g, v), r in zip(present, reduced):
            out[i] = (tf.cast(r, g.dtype), v)
        return out

    def _plain_sum(self, grads_and_vars, present):
        """Keras's own all-reduce SUM (one collective call), counted."""
        nbytes = tf.constant(0, tf.int64)
        for g, _ in grads_and_vars:
            if isinstance(g, tf.IndexedSlices):
                nbytes += tf.size(g.values, tf.int64) * g.values.dtype.size
                nbytes += tf.size(g.indices, tf.int64) * g.indices.dtype.size
            elif g is not None:
                nbytes += int(np.prod(g.shape)) * g.dtype.size
        summed = super().reduce_gradients(grads_and_vars)
        self._count(1, nbytes)
        return summed

    def _compressed_mean(self, context, present, local):
        channel = Channel(context)
        indices = [self._get_variable_index(v) for _, _, v in present]
        memories = [self._error_memory[i] for i in indices]
        seeds = [self._seed(context, i) for i in indices]
        compressor = self.compression
        majority_vote = self.aggregation == "majority_vote"
        updates = []
        if compressor.one_round:
            # Local work before and after the collective runs as two fused
            # XLA computations: at millions of parameters the unfused ops
            # cost more than the bytes they save on a 1 Gbit/s link.
            values = [None if m is None else tf.convert_to_tensor(m) for m in memories]
            wires, new_memories = _jit(compressor, "encode", _encode_with_memory)(
                compressor, local, values, seeds
            )
            received = compressor.communicate(channel, wires, majority_vote)
            shapes = [tuple(x.shape) for x in local]
            aggregates = _jit(compressor, "aggregate", _aggregate)(
                compressor, received, shapes, seeds, channel.num_replicas, majority_vote
            )
            for memory, value in zip(memories, new_memories):
                if memory is not None:
                    updates.append(memory.assign(value))
        else:
            inputs = [x if e is None else x + e for x, e in zip(local, memories)]
            states = [
                [tf.convert_to_tensor(s) for s in self._compressor_state[i]]
                for i in indices
            ]
            aggregates, decoded, new_states = compressor.reduce(
                channel, inputs, seeds, states, majority_vote=majority_vote
            )
            for p, d, memory in zip(inputs, decoded, memories):
                if memory is not None:
                    updates.append(memory.assign(_next_memory(p, d, memory)))
            for i, new in zip(indices, new_states):
                for variable, value in zip(self._compressor_state[i], new):
                    finite = tf.logical_and(
                        tf.reduce_all(tf.math.is_finite(value)),
                        tf.reduce_any(value != 0),
                    )
                    updates.append(variable.assign(tf.where(finite, value, variable)))
        with tf.control_dependencies(updates):
            self._count(channel.rounds, tf.constant(channel.bytes, tf.int64))
            return [tf.identity(a) for a in aggregates]

    def _seed(self, context, index):
        step = tf.cast(self.iterations, tf.int64)
        if self.compression.shared_randomness:
            stream = step
        else:
            replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
            stream = step * context.num_replicas_in_sync + replica
        return tf.stack([tf.constant(index, tf.int64), stream])

    def _count(self, rounds, nbytes):
        self._communication_rounds.assign_add(tf.constant(rounds, tf.int64))
        self._communication_bytes.assign_add(nbytes)
        self._communication_step_bytes.assign(nbytes)

    def communication_stats(self):
        """Bytes and collective calls of this replica (SPEC §2).

        `bytes_per_step`: bytes handed to collectives in the last step;
        `rounds`: collective calls so far; `bytes_total`: all bytes so far;
        `float32_bytes_per_step`: what an uncompressed float32 all-reduce of
        every trainable variable hands over, for comparison.
        """
        if not self.built:
            return {
                "bytes_per_step": 0,
                "rounds": 0,
                "bytes_total": 0,
                "float32_bytes_per_step": 0,
            }
        return {
            "bytes_per_step": int(self._communication_step_bytes.numpy()),
            "rounds": int(self._communication_rounds.numpy()),
            "bytes_total": int(self._communication_bytes.numpy()),
            "float32_bytes_per_step": self._uncompressed_bytes,
        }

    def save_own_variables(self, store):
        # Keras's loop, except that per-replica state is stored per replica.
        for i, variable in enumerate(self.variables):
            if isinstance(variable, ReplicaLocalVariable):
                store[str(i)] = variable.replica_values()
            else:
                store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        per_replica = {}
        plain = {}
        for key in store.keys():
            variable = (
                self.variables[int(key)] if int(key) < len(self.variables) else None
            )
            if isinstance(variable, ReplicaLocalVariable):
                per_replica[key] = store[key]
                plain[key] = np.zeros(variable.shape, variable.dtype)
            else:
                plain[key] = store[key]
        super().load_own_variables(plain)
        if len(plain) == len(self.variables):
            for key, value in per_replica.items():
                self.variables[int(key)].assign_replica_values(value)


def _next_memory(sent_input, decoded, memory):
    """e ← p − decompress(c), unless p is not finite (then e is kept)."""
    finite = tf.reduce_all(tf.math.is_finite(sent_input))
    return tf.where(finite, sent_input - decoded, memory)


def _encode_with_memory(compressor, local, memories, seeds):
    inputs = [x if e is None else x + e for x, e in zip(local, memories)]
    wires, decoded = compressor.encode(inputs, seeds)
    new_memories = [
        None if e is None else _next_memory(p, d, e)
        for p, d, e in zip(inputs, decoded, memories)
    ]
    return wires, new_memories


def _aggregate(compressor, received, shapes, seeds, num_replicas, majority_vote):
    return compressor.aggregate(received, shapes, seeds, num_replicas, majority_vote)


def _jit(compressor, name, function):
    """`function` as a tf.function, XLA-compiled when the compressor allows it.

    Python arguments (the compressor, shapes, flags) are part of the trace
    signature; one tf.function per compressor instance and phase is cached.
    """
    cache = compressor.__dict__.setdefault("_tfso_compiled", {})
    if name not in cache:
        cache[name] = tf.function(
            function, jit_compile=bool(compressor.jit_compatible), autograph=False
        )
    return cache[name]


def _dense_float32(gradient):
    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
    return tf.cast(gradient, tf.float32)
