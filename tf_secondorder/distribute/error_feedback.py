"""Error feedback: the one path every memory of a compression residual takes.

Per replica i, tensor x_i and memory e_i (a per-replica variable that
survives checkpoints):

    p_i = x_i + e_i;   (ĝ, s_i) = send(p_i);   e_i ← p_i − s_i

where s_i is what this replica's encoding of p_i decodes to. What a biased
compressor drops in one step is sent in later ones (Karimireddy et al.
2019; Stich et al. 2018). `compensate` is that equation; it serves the
gradient's memory (`ErrorFeedback`, fused into one XLA computation by
`aggregators.OneRound`) and the local-SGD pseudo-gradients' memory
(`local_sgd.py`). The memory advances only on steps whose gradients were
finite on every replica (`Channel.commit`).
"""

import tensorflow as tf


def compensate(send, inputs, memories):
    """(what `send` returns first, the new memories): `send(inputs +
    memories)` must return (anything, what each sum decodes to)."""
    sums = [x + e for x, e in zip(inputs, memories)]
    result, sent = send(sums)
    return result, [p - s for p, s in zip(sums, sent)]


class ErrorFeedback:
    """An aggregator with a per-replica memory around another aggregator."""

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
        aggregates, residuals = self.inner.reduce_with_memory(
            channel, inputs, values, keys, step
        )
        for memory, residual in zip(memories, residuals):
            channel.commit(memory, residual)
        # Nothing wraps error feedback, so what was sent is not returned.
        return aggregates, None
