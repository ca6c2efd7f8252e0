"""Aggregators: how replicas combine their tensors into one (replica context).

An aggregator runs collectives over a `Channel`; the encoding is a
compressor's (`tf_secondorder.compression`). Every aggregator answers

    reduce(channel, inputs, keys, step) -> (aggregates, sent)

with `inputs` this replica's float32 tensors, `keys` their variable indices
(seeds), `step` the int64 step number; `aggregates` the combined tensors
(equal on every replica) and `sent` what this replica's own contribution
decodes to, which error feedback (`error_feedback.py`) subtracts. State an
aggregator keeps between steps is created in `build` and assigned through
`channel.commit`, so it does not advance on a skipped step.

- `AllReduceMean`: a summable compressor's wires are summed by one all-reduce.
- `GatherMean`: any compressor's wires are all-gathered and decoded locally.
- `MajorityVote` (`voting.py`): the sign of the sum of the replicas' signs,
  all-gathered or tallied by shard owners.
- `PowerSGDMean`: PowerSGD's two all-reduces with a warm-started factor.
- `Bidirectional` (`bidirectional.py`): each replica serves 1/N of the mean.
- `Artemis` (`artemis.py`): the same exchange, memories that learn the gradient.

A compressor of more than one round (`rounds > 1`, PowerSGD) is served by
the aggregator registered for its class with `@serves(...)`; the others by
the aggregator `aggregation` names (docs/architecture.md, "Where to add a
compressor or an aggregator").
"""

import functools

import tensorflow as tf

from tf_secondorder.compression import low_rank
from tf_secondorder.distribute.error_feedback import compensate
from tf_secondorder.distribute.seeds import channel_seed

_SERVED = {}


def serves(compressor_class):
    """Class decorator: the aggregator `compressor_class` (and its
    subclasses) always gets, whatever `aggregation` says; for multi-round
    compressors, whose rounds only their own aggregator knows."""

    def register(aggregator_class):
        _SERVED[compressor_class] = aggregator_class
        return aggregator_class

    return register


def served_by(compressor):
    """The aggregator class registered for `compressor`'s class, or None."""
    for cls in type(compressor).__mro__:
        if cls in _SERVED:
            return _SERVED[cls]
    return None


class Aggregator:
    """Base: no state."""

    def build(self, state, variables):
        """Creates state through `state` (the optimizer's `OptimizerState`)."""

    def reduce(self, channel, inputs, keys, step):
        raise NotImplementedError

    def reduce_with_memory(self, channel, inputs, memories, keys, step):
        """`reduce` of inputs + memories, with the new memories (error
        feedback, `error_feedback.compensate`)."""
        return compensate(
            lambda sums: self.reduce(channel, sums, keys, step), inputs, memories
        )


class OneRound(Aggregator):
    """Encode, one collective, decode. The local work before and after the
    collective runs as two fused XLA computations when the compressor
    allows: at millions of parameters each unfused elementwise pass over the
    gradient costs more time than the bytes the compressor saves on a slow
    link (docs/benchmarks.md has the measurements)."""

    def __init__(self, compressor):
        self.compressor = compressor

    @functools.cached_property
    def _encode(self):
        return tf.function(
            self.encode, jit_compile=self.compressor.jit_compatible, autograph=False
        )

    @functools.cached_property
    def _encode_with_memory(self):
        def encode(inputs, memories, seeds):
            return compensate(lambda sums: self.encode(sums, seeds), inputs, memories)

        return tf.function(
            encode, jit_compile=self.compressor.jit_compatible, autograph=False
        )

    @functools.cached_property
    def _combine(self):
        return tf.function(
            self.combine, jit_compile=self.compressor.jit_compatible, autograph=False
        )

    def encode(self, inputs, seeds):
        """(wires, what each wire decodes to on this replica)."""
        wires = [self.compressor.encode(x, s) for x, s in zip(inputs, seeds)]
        sent = [
            self.compressor.decode(w, x.shape, s)
            for w, x, s in zip(wires, inputs, seeds)
        ]
        return wires, sent

    def exchange(self, channel, wires):
        raise NotImplementedError

    def combine(self, received, shapes, seeds, num_replicas):
        raise NotImplementedError

    def reduce(self, channel, inputs, keys, step):
        seeds = [channel_seed(self.compressor, channel, k, step) for k in keys]
        wires, sent = self._encode(inputs, seeds)
        return self._exchange_and_combine(channel, wires, inputs, seeds), sent

    def reduce_with_memory(self, channel, inputs, memories, keys, step):
        """`reduce` of inputs + memories, with the new memories: the addition,
        the encoding and the residual in one fused computation (at millions
        of parameters each unfused pass costs about what a 1-bit exchange
        does on a slow link)."""
        seeds = [channel_seed(self.compressor, channel, k, step) for k in keys]
        wires, residuals = self._encode_with_memory(inputs, memories, seeds)
        return self._exchange_and_combine(channel, wires, inputs, seeds), residuals

    def _exchange_and_combine(self, channel, wires, inputs, seeds):
        received = self.exchange(channel, wires)
        shapes = [tuple(x.shape) for x in inputs]
        return self._combine(received, shapes, seeds, channel.num_replicas)


class AllReduceMean(OneRound):
    """Mean of summable wires: decode(Σ_i wires_i) / N."""

    def exchange(self, channel, wires):
        return channel.all_reduce(wires)

    def combine(self, received, shapes, seeds, num_replicas):
        return [
            self.compressor.decode(w, shape, s) / num_replicas
            for w, shape, s in zip(received, shapes, seeds)
        ]


class GatherMean(OneRound):
    """Mean of every replica's decoded wires: (1/N) Σ_i decode(wires_i)."""

    def exchange(self, channel, wires):
        return channel.all_gather(wires)

    def decoded(self, wire, shape, seed, num_replicas):
        # A replica's seed stream differs from this one's only when the
        # compressor draws per replica; those decode without the seed.
        return [
            self.compressor.decode([w[r] for w in wire], shape, seed)
            for r in range(num_replicas)
        ]

    def combine(self, received, shapes, seeds, num_replicas):
        return [
            tf.add_n(self.decoded(w, shape, s, num_replicas)) / num_replicas
            for w, shape, s in zip(received, shapes, seeds)
        ]


@serves(low_rank.PowerSGD)
class PowerSGDMean(Aggregator):
    """Rank-r PowerSGD: P = M·Q, all-reduce P, orthonormalise, Q = Mᵀ·P̂,
    all-reduce Q; the mean is P̂·Q_sumᵀ/N and this replica's own part P̂·Q_iᵀ.

    State: per tensor, the last mean Q (equal on every replica), the warm
    start of the next step.
    """

    def __init__(self, compressor):
        self.compressor = compressor
        self.factors = []

    def build(self, state, variables):
        self.factors = []
        for index, variable in enumerate(variables):
            first = self.compressor.initial_factor(variable.shape, index)
            self.factors.append(
                None
                if first is None
                else state.shared(variable, "powersgd_q", first.shape, first)
            )

    def reduce(self, channel, inputs, keys, step):
        n = channel.num_replicas
        plans = [self.compressor.plan(tuple(x.shape)) for x in inputs]
        factors = [self.factors[k] for k in keys]
        matrices = [
            None if p is None else tf.reshape(x, p[:2]) for x, p in zip(inputs, plans)
        ]
        first = channel.all_reduce(
            [
                [x] if p is None else [low_rank.left_factor(m, tf.convert_to_tensor(q))]
                for x, p, m, q in zip(inputs, plans, matrices, factors)
            ]
        )
        bases = [
            None if p is None else low_rank.orthonormal(w[0])
            for w, p in zip(first, plans)
        ]
        own = [
            None if p is None else low_rank.right_factor(m, b)
            for p, m, b in zip(plans, matrices, bases)
        ]
        summed = iter(channel.all_reduce([[q] for q in own if q is not None]))
        aggregates, sent = [], []
        for x, p, w, b, q, factor in zip(inputs, plans, first, bases, own, factors):
            if p is None:
                aggregates.append(w[0] / n)
                sent.append(x)
                continue
            q_sum = next(summed)[0]
            aggregates.append(low_rank.reconstruct(b, q_sum, x.shape) / n)
            sent.append(low_rank.reconstruct(b, q, x.shape))
            mean_q = q_sum / n
            # A zero gradient gives Q = 0, from which no later step recovers.
            if_nonzero = tf.where(tf.reduce_any(mean_q != 0), mean_q, factor)
            channel.commit(factor, if_nonzero)
        return aggregates, sent
