"""The communication options of every tf_secondorder optimizer (SPEC §2, §4.1–4.3).

`Communication` replaces Keras's cross-replica gradient sum. Per replica i,
with N replicas and g_i the replica's own gradient (Keras hands the hook
g_i/N because the loss is pre-scaled):

    x_i = local_gradient(g_i)                  # identity; Signum: its momentum
    p_i = x_i + e_i                            # e_i: error-feedback memory
    c_i = C(p_i);  e_i ← p_i − decompress(c_i) # kept if p_i is not finite
    mean:           ĝ = (1/N) Σ_i decompress(c_i)
    majority_vote:  ĝ = sign(Σ_i sign(decompress(c_i)))   (sign(0) = +1)
    bidirectional:  ĝ compressed again by its server replica, with a server
                    memory (`bidirectional.py`)

ĝ goes to the optimizer's update as the gradient. With one replica (no
strategy) nothing is compressed or sent and ĝ = x_1, so the same script
trains unchanged on a laptop.
"""

import numpy as np
import tensorflow as tf

from tf_secondorder.distribute import bidirectional, compressors
from tf_secondorder.distribute._keras_hooks import (
    ReplicaLocalVariable,
    StepHooks,
    add_replica_local_variable,
)
from tf_secondorder.distribute.averaging import ModelAveraging
from tf_secondorder.distribute.channel import Channel
from tf_secondorder.distribute.saddle import SaddlePerturbation

AGGREGATIONS = ("mean", "majority_vote", "bidirectional")


def _slot_name(variable, suffix):
    return f"{variable.path.replace('/', '_')}_{suffix}"


class Communication(SaddlePerturbation, ModelAveraging, StepHooks):
    """Mixin for Keras optimizers: compression, error feedback, majority vote,
    bidirectional compression, local SGD (`averaging.py`) and the saddle
    perturbation (`saddle.py`).

    Subclasses call `_init_communication(...)` in `__init__`,
    `build_communication(var_list)` at the end of `build`, and add
    `communication_config()` to `get_config`.
    """

    def _init_communication(
        self,
        compression=None,
        error_feedback=None,
        aggregation="mean",
        average_every=None,
        average_warmup_steps=0,
        saddle_escape=None,
    ):
        self.compression = compressors.get(compression)
        self._init_averaging(average_every, average_warmup_steps)
        self._init_saddle_escape(saddle_escape)
        if self.average_every is not None and self.compression is not None:
            raise ValueError(
                "`average_every` (local SGD) sends weights, not gradients: it "
                "cannot be combined with `compression`. Received: "
                f"average_every={average_every!r}, compression={compression!r}"
            )
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
        if aggregation == "bidirectional":
            bidirectional.check_compressor(self.compression)
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
        al.'s algorithm, which has no memory. Bidirectional compression keeps
        worker and server memories unless `error_feedback=False`.
        """
        if self.compression is None:
            return False
        if self.error_feedback is not None:
            return self.error_feedback
        if self.aggregation == "bidirectional":
            return True
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
            "average_every": self.average_every,
            "average_warmup_steps": self.average_warmup_steps,
            "saddle_escape": (
                None if self.saddle_escape is None else self.saddle_escape.get_config()
            ),
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
        self._server_memory = None
        self._received_bytes = 0
        self._compressor_state = [[] for _ in var_list]
        self._uncompressed_bytes = 4 * sum(int(np.prod(v.shape)) for v in var_list)
        self.build_averaging()
        self.build_saddle_escape()
        if self.compression is None:
            return
        replicas = self._distribution_strategy.num_replicas_in_sync
        if self.aggregation == "bidirectional" and self.uses_error_feedback:
            total = sum(int(np.prod(v.shape)) for v in var_list)
            self._server_memory = add_replica_local_variable(
                self,
                (bidirectional.chunk_length(total, replicas),),
                "float32",
                "server_memory",
            )
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
        if n > 1 and self.average_every is not None:
            return self.local_step_gradients(grads_and_vars, n)
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
        dense = 0
        for g, _ in grads_and_vars:
            if isinstance(g, tf.IndexedSlices):
                nbytes += tf.size(g.values, tf.int64) * g.values.dtype.size
                nbytes += tf.size(g.indices, tf.int64) * g.indices.dtype.size
            elif g is not None:
                dense += int(np.prod(g.shape)) * g.dtype.size
        summed = super().reduce_gradients(grads_and_vars)
        # An all-reduce delivers what it is handed (sparse parts: varies).
        self._received_bytes = dense
        self._count(1, nbytes + dense)
        return summed

    def _compressed_mean(self, context, present, local):
        channel = Channel(context)
        indices = [self._get_variable_index(v) for _, _, v in present]
        memories = [self._error_memory[i] for i in indices]
        seeds = [self._seed(context, i) for i in indices]
        compressor = self.compression
        majority_vote = self.aggregation == "majority_vote"
        updates = []
        if self.aggregation == "bidirectional":
            aggregates = self._bidirectional(channel, local, memories, updates)
        elif compressor.one_round:
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
        self._received_bytes = channel.received
        with tf.control_dependencies(updates):
            self._count(channel.rounds, tf.constant(channel.bytes, tf.int64))
            return [tf.identity(a) for a in aggregates]

    def _bidirectional(self, channel, local, memories, updates):
        worker = (
            None if memories[0] is None else [tf.convert_to_tensor(m) for m in memories]
        )
        server = self._server_memory
        server_value = None if server is None else tf.convert_to_tensor(server)
        aggregates, new_worker, new_server = bidirectional.bidirectional_mean(
            self.compression,
            channel,
            local,
            worker,
            server_value,
            tf.cast(self.iterations, tf.int64),
        )
        if new_worker is not None:
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(x)) for x in local])
            for memory, value in zip(memories, new_worker):
                updates.append(memory.assign(tf.where(finite, value, memory)))
        if new_server is not None:
            finite = tf.reduce_all(tf.math.is_finite(new_server))
            updates.append(server.assign(tf.where(finite, new_server, server)))
        return aggregates

    def _seed(self, context, index):
        step = tf.cast(self.iterations, tf.int64)
        if self.compression.shared_randomness:
            stream = step
        else:
            replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
            stream = step * context.num_replicas_in_sync + replica
        return tf.stack([tf.constant(index, tf.int64), stream])

    def _count_from_cross_replica(self, rounds, nbytes):
        self._communication_rounds.assign_add(tf.constant(rounds, tf.int64))
        self._communication_bytes.assign_add(tf.constant(nbytes, tf.int64))
        self._communication_step_bytes.assign(tf.constant(nbytes, tf.int64))

    def _count(self, rounds, nbytes):
        self._communication_rounds.assign_add(tf.constant(rounds, tf.int64))
        self._communication_bytes.assign_add(nbytes)
        self._communication_step_bytes.assign(nbytes)

    def communication_stats(self):
        """Bytes and collective calls of this replica (SPEC §2).

        `bytes_per_step`: bytes handed to collectives in the last step;
        `rounds`: collective calls so far; `bytes_total`: all bytes so far;
        `float32_bytes_per_step`: what an uncompressed float32 all-reduce of
        every trainable variable hands over, for comparison;
        `bytes_received_per_step`: what the collectives of one compressed
        gradient exchange deliver to this replica (all_gather: N buffers).
        """
        if not self.built:
            return {
                "bytes_per_step": 0,
                "rounds": 0,
                "bytes_total": 0,
                "float32_bytes_per_step": 0,
                "bytes_received_per_step": 0,
            }
        return {
            "bytes_per_step": int(self._communication_step_bytes.numpy()),
            "rounds": int(self._communication_rounds.numpy()),
            "bytes_total": int(self._communication_bytes.numpy()),
            "float32_bytes_per_step": self._uncompressed_bytes,
            "bytes_received_per_step": self._received_bytes,
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
