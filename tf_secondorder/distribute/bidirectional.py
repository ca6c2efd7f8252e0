"""Bidirectional compression with error feedback on both sides.

Workers and servers each compress what they send and keep the compression
residual as a memory added to their next message: DoubleSqueeze (Tang, Yu,
Lian, Zhang, Liu, ICML 2019, arXiv:1905.05957) and the exchange of 1-bit
Adam (Tang et al., ICML 2021, arXiv:2102.02888) as DeepSpeed implements it,
with the server's work split across the replicas. Artemis (`artemis.py`)
runs the same exchange with a different worker memory.

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


class ChunkExchange:
    """One step's exchange of flattened chunks on one replica: the uplink
    (`all_to_all` of each chunk's code to its server), the server's reply
    and the downlink (`all_gather` of every server's reply).

    Attributes:
        chunks: float32 [N, L], this replica's inputs flattened, zero-padded.
        total: d, the inputs' element count (the rest of N·L is padding).
    """

    def __init__(self, compressor, channel, inputs, step):
        self.compressor = compressor
        self.channel = channel
        self.step = step
        self.n = channel.num_replicas
        self.me = tf.cast(channel.context.replica_id_in_sync_group, tf.int64)
        self.shapes = [tuple(x.shape) for x in inputs]
        self.sizes = [int(x.shape.num_elements()) for x in inputs]
        self.total = sum(self.sizes)
        self.length = chunk_length(self.total, self.n)
        flat = tf.concat([tf.reshape(x, [-1]) for x in inputs], 0)
        padding = [[0, self.n * self.length - self.total]]
        self.chunks = tf.reshape(tf.pad(flat, padding), [self.n, self.length])

    def _seed(self, chunk, replica):
        # Randomness differs per (step, replica, chunk); server replies use
        # chunks N..2N−1.
        return replica_seed(chunk, self.step, replica, self.n)

    def _decode(self, wire, seed):
        return self.compressor.decode(wire, (self.length,), seed)

    def up(self, chunks):
        """Sends chunk j of `chunks` [N, L] to server j. Returns (what this
        replica's codes decode to [N, L], what this replica as a server
        received: N decoded chunks, one per sending replica)."""
        n, me = self.n, self.me
        wires = [self.compressor.encode(chunks[j], self._seed(j, me)) for j in range(n)]
        sent = tf.stack(
            [self._decode(w, self._seed(j, me)) for j, w in enumerate(wires)]
        )
        stacked = [tf.stack([w[k] for w in wires]) for k in range(len(wires[0]))]
        (received,) = self.channel.all_to_all([stacked])
        decoded = [
            self._decode([w[i] for w in received], self._seed(me, i)) for i in range(n)
        ]
        return sent, decoded

    def encode_reply(self, value):
        """(the wire of this server's reply [L], what it decodes to)."""
        seed = self._seed(self.n + self.me, self.me)
        wire = self.compressor.encode(value, seed)
        return wire, self._decode(wire, seed)

    def down(self, wire):
        """Every server's reply, decoded and concatenated: float32 [N·L]."""
        (gathered,) = self.channel.all_gather([wire])
        return tf.concat(
            [
                self._decode([w[r] for w in gathered], self._seed(self.n + r, r))
                for r in range(self.n)
            ],
            0,
        )

    def unflatten(self, flat):
        """Tensors shaped like the inputs from a flat [≥ d] vector."""
        pieces = tf.split(tf.reshape(flat, [-1])[: self.total], self.sizes)
        return [tf.reshape(p, s) for p, s in zip(pieces, self.shapes)]


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
        exchange = ChunkExchange(self.compressor, channel, inputs, step)
        sent, received = exchange.up(exchange.chunks)
        mean = tf.add_n(received) / float(exchange.n)
        if self.memory is None:
            reply, _ = exchange.encode_reply(mean)
        else:

            def send(served):
                reply, decoded = exchange.encode_reply(served[0])
                return reply, [decoded]

            reply, (residual,) = compensate(send, [mean], [self.memory])
            channel.commit(self.memory, residual)
        return exchange.unflatten(exchange.down(reply)), exchange.unflatten(sent)
