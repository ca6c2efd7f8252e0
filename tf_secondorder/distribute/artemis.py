"""Artemis: bidirectional compression with a worker memory that learns the
gradient (Philippenko and Dieuleveut, "Bidirectional compression in
heterogeneous settings for distributed or federated learning with partial
participation: tight convergence guarantees", arXiv:2006.14591).

Error feedback (`bidirectional.py`) remembers what compression dropped.
Artemis's worker memory h_i instead tracks replica i's own gradient, as in
DIANA: replica i sends the compressed difference between its gradient and
its memory, so what it sends shrinks as h_i learns g_i, and the gradients'
dissimilarity across replicas drops out of the convergence rate. Per step,
with active replicas S (all of them unless `participation` < 1), α the
memory rate and C the compressor:

    active replica i:  Δ̂_i = C(g_i − h_i);   h_i ← h_i + α·Δ̂_i
    server:            ĝ = h̄ + (1/N)·Σ_{i∈S} Δ̂_i;   h̄ ← h̄ + (α/N)·Σ_{i∈S} Δ̂_i
    downlink:          every replica receives and applies C(ĝ)

h̄ = (1/N)·Σ_i h_i is the mean of all replicas' memories, which the server
keeps up to date from the Δ̂_i it receives: a replica left out of a step
contributes its memory h_i in place of its gradient, and its memory stays
as it was. The downlink has no memory, as in the paper's Artemis. The
paper's Polyak–Ruppert average of the iterates is
`tfso.callbacks.IterateAveraging`.

The exchange is `bidirectional.ChunkExchange`: replica r serves chunk r of
the flattened gradient, so h̄ is split the same way and a replica receives
2·d·b bits per step at any N. Under tf.distribute every replica takes part
in every collective, so a left-out replica's code is still sent and the
server ignores it: `participation` models devices that drop out (federated
learning), it does not save bytes here.
"""

import numpy as np
import tensorflow as tf

from tf_secondorder.distribute.aggregators import Aggregator
from tf_secondorder.distribute.bidirectional import ChunkExchange, chunk_length
from tf_secondorder.distribute.seeds import replica_seed

# The key of the participation draw's seed: variable keys are >= 0.
_PARTICIPATION_KEY = -1


def default_memory_rate(compressor, chunk_shape):
    """α = 1/(2(ω + 1)) for an unbiased compressor of variance factor ω (the
    paper's choice); 1 for a biased one that carries magnitudes (top-k,
    scaled sign, casts), for which h ← h + C(g − h) shrinks ‖g − h‖ the most
    (EF21's memory, Richtárik, Sokolov, Fatkhullin 2021); None when an
    unbiased compressor declares no ω."""
    omega = compressor.variance_bound(chunk_shape)
    if omega is not None:
        return 1.0 / (2.0 * (omega + 1.0))
    return None if compressor.unbiased else 1.0


def participants(step, num_replicas, participation):
    """bool [N]: which replicas take part in `step`, each with probability
    `participation`, drawn alike on every replica from the step."""
    if participation >= 1.0:
        return tf.ones([num_replicas], tf.bool)
    draw = tf.random.stateless_uniform(
        [num_replicas], replica_seed(_PARTICIPATION_KEY, step), dtype=tf.float32
    )
    return draw < participation


class Artemis(Aggregator):
    """The exchange above.

    State (per replica, saved with the optimizer):
        worker_memory: h_i over the flattened gradient, [N·L] (padding
            stays 0), the estimate of this replica's gradient.
        server_memory: h̄ over the chunk this replica serves, [L] (padding
            stays 0), the mean of every replica's h over it.
    """

    def __init__(self, compressor, memory_rate=None, participation=1.0):
        self.compressor = compressor
        self.memory_rate = memory_rate
        self.participation = participation
        # α in use: `memory_rate`, or the default at the chunks' shape.
        self.alpha = memory_rate
        self.worker_memory = None
        self.server_memory = None

    def build(self, state, variables):
        total = sum(int(v.shape.num_elements()) for v in variables)
        length = chunk_length(total, state.num_replicas)
        if self.memory_rate is None:
            self.alpha = default_memory_rate(self.compressor, (length,))
        self.worker_memory = state.per_replica(
            None, "artemis_worker_memory", (state.num_replicas * length,)
        )
        self.server_memory = state.per_replica(None, "artemis_server_memory", (length,))

    def reduce(self, channel, inputs, keys, step):
        exchange = ChunkExchange(self.compressor, channel, inputs, step)
        n, length = exchange.n, exchange.length
        alpha = self.alpha
        active = participants(step, n, self.participation)

        memory = tf.reshape(self.worker_memory, [n, length])
        sent, received = exchange.up(exchange.chunks - memory)
        # The padding's memory stays 0: its "gradient" is 0 by definition.
        real = np.arange(n * length).reshape(n, length) < exchange.total
        own_active = tf.gather(active, exchange.me)
        learned = tf.where(own_active & real, memory + alpha * sent, memory)
        channel.commit(self.worker_memory, tf.reshape(learned, [-1]))

        served = tf.cast(exchange.me, tf.int32) * length + tf.range(length)
        mean_delta = tf.add_n(
            [tf.where(active[i], delta, 0.0) for i, delta in enumerate(received)]
        ) / float(n)
        mean_delta = tf.where(served < exchange.total, mean_delta, 0.0)
        estimate = self.server_memory + mean_delta
        channel.commit(self.server_memory, self.server_memory + alpha * mean_delta)

        reply, _ = exchange.encode_reply(estimate)
        # Nothing wraps Artemis (error feedback is off), so no `sent`.
        return exchange.unflatten(exchange.down(reply)), None
