"""Error feedback: one wrapper for every aggregator.

Per replica i, tensor x_i and memory e_i (a per-replica variable that
survives checkpoints):

    p_i = x_i + e_i;   (ĝ, s_i) = inner.reduce(p_i);   e_i ← p_i − s_i

where s_i is what the inner aggregator's encoding of p_i decodes to. What a
biased compressor drops in one step is sent in later ones (Karimireddy et al.
2019; Stich et al. 2018). The memory advances only on steps whose gradients
were finite on every replica (`Channel.commit`).
"""

import tensorflow as tf

from tf_secondorder.distribute.aggregators import Aggregator, OneRound


class ErrorFeedback(Aggregator):
    def __init__(self, inner):
        self.inner = inner
        self.memories = []

    def build(self, state, variables):
        self.inner.build(state, variables)
        self.memories = [
            state.per_replica(v, "error_feedback", tuple(v.shape)) for v in variables
        ]

    def reduce(self, channel, inputs, keys, step):
        memories = [self.memories[k] for k in keys]
        values = [tf.convert_to_tensor(e) for e in memories]
        if isinstance(self.inner, OneRound):
            aggregates, residuals = self.inner.reduce_with_memory(
                channel, inputs, values, keys, step
            )
        else:
            sums = [x + e for x, e in zip(inputs, values)]
            aggregates, sent = self.inner.reduce(channel, sums, keys, step)
            residuals = [p - s for p, s in zip(sums, sent)]
        for memory, residual in zip(memories, residuals):
            channel.commit(memory, residual)
        # Nothing wraps error feedback, so what was sent is not returned.
        return aggregates, None
