"""Bidirectional compression with error feedback on both sides.

Workers and servers each compress what they send and keep the compression
residual as a memory added to their next message: DoubleSqueeze (Tang, Yu,
Lian, Zhang, Liu, ICML 2019, arXiv:1905.05957) and the exchange of 1-bit
Adam (Tang et al., ICML 2021, arXiv:2102.02888) as DeepSpeed implements it,
with the server's work split across the replicas. Artemis and MCM
(Philippenko, Dieuleveut) differ: Artemis's worker memory tracks the
gradient (DIANA-style) instead of the residual, and MCM compresses the
model on the way back.

Each replica is the server of 1/N of the flattened gradient. Per step,
replica i with input p_i (error feedback adds the worker memory before this
aggregator sees it) and, as the server of chunk r = i, server memory s_i; N
replicas; C the compressor:

    split p_i into N chunks p_i^(j) of L = ⌈d/N⌉ elements;  c_i^(j) = C(p_i^(j))
    all_to_all: chunk j's code goes to replica j
    server r:   a_r = (1/N) Σ_i D(c_i^(r));  q_r = a_r + s_r
                z_r = C(q_r);  s_r ← q_r − D(z_r)
    all_gather: every replica gets every z_r;  ĝ = [D(z_1), ..., D(z_N)]

Each replica sends d·b/N·(N−1) bits in the all_to_all and receives as many,
then sends d·b/N and receives d·b in the all_gather: O(d·b) per replica at
any N, where an all_gather of every replica's whole code delivers N·d·b.
Every replica decodes the same ĝ, so replicas stay in sync. What this
replica sent decodes to [D(c_i^(1)), ..., D(c_i^(N))], the worker memory's
residual.
"""

import tensorflow as tf

from tf_secondorder.distribute.aggregators import Aggregator
from tf_secondorder.distribute.error_feedback import compensate
from tf_secondorder.distribute.seeds import replica_seed


def chunk_length(total, num_replicas):
    return -(-total // num_replicas)


class Bidirectional(Aggregator):
    """The exchange above. `server_memory=False` keeps s at zero."""

    def __init__(self, compressor, server_memory=True):
        self.compressor = compressor
        self.server_memory = server_memory
        self.memory = None

    def build(self, state, variables):
        self.memory = None
        if self.server_memory:
            total = sum(int(v.shape.num_elements()) for v in variables)
            length = chunk_length(total, state.num_replicas)
            self.memory = state.per_replica(None, "server_memory", (length,))

    def reduce(self, channel, inputs, keys, step):
        compressor = self.compressor
        n = channel.num_replicas
        me = tf.cast(channel.context.replica_id_in_sync_group, tf.int64)

        def seed(chunk, replica):
            return replica_seed(chunk, step, replica, n)

        shapes = [tuple(x.shape) for x in inputs]
        sizes = [int(x.shape.num_elements()) for x in inputs]
        total = sum(sizes)
        length = chunk_length(total, n)
        flat = tf.concat([tf.reshape(x, [-1]) for x in inputs], 0)
        chunks = tf.reshape(tf.pad(flat, [[0, n * length - total]]), [n, length])

        # Worker → servers. Randomness differs per (step, replica, chunk).
        wires = [compressor.encode(chunks[j], seed(j, me)) for j in range(n)]
        decoded = [
            compressor.decode(w, (length,), seed(j, me)) for j, w in enumerate(wires)
        ]
        stacked = [tf.stack([w[k] for w in wires]) for k in range(len(wires[0]))]
        (received,) = channel.all_to_all([stacked])

        # Server of chunk `me`: mean of the replicas' codes, compressed again.
        mean = tf.add_n(
            [
                compressor.decode([w[i] for w in received], (length,), seed(me, i))
                for i in range(n)
            ]
        ) / float(n)
        server_seed = seed(n + me, me)
        if self.memory is None:
            reply = compressor.encode(mean, server_seed)
        else:

            def send(served):
                reply = compressor.encode(served[0], server_seed)
                return reply, [compressor.decode(reply, (length,), server_seed)]

            reply, (residual,) = compensate(send, [mean], [self.memory])
            channel.commit(self.memory, residual)

        # Servers → everyone.
        (gathered,) = channel.all_gather([reply])
        parts = [
            compressor.decode([w[r] for w in gathered], (length,), seed(n + r, r))
            for r in range(n)
        ]
        return _unflatten(tf.concat(parts, 0), sizes, shapes), _unflatten(
            tf.reshape(tf.stack(decoded), [-1]), sizes, shapes
        )


def _unflatten(flat, sizes, shapes):
    pieces = tf.split(flat[: sum(sizes)], sizes)
    return [tf.reshape(p, s) for p, s in zip(pieces, shapes)]
