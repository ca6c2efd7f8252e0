"""Sparsifying and low-rank compressors: top-k, random-k, PowerSGD."""

import math

import numpy as np
import tensorflow as tf

from tf_secondorder.distribute.compressors import (
    Compressor,
    _register,
    _size,
    check_ratio,
)


def _k(ratio, d):
    return max(1, min(d, math.ceil(ratio * d)))


def _scatter(indices, values, shape):
    d = _size(shape)
    dense = tf.scatter_nd(tf.reshape(indices, [-1, 1]), values, [d])
    return tf.reshape(dense, shape)


@_register("topk")
class TopK(Compressor):
    """The k = ⌈ratio·d⌉ entries of largest magnitude, with their indices. Biased.

    Wire: k float32 values and k int32 indices (8k bytes); indices differ
    between replicas, so wires are all-gathered.
    """

    def __init__(self, ratio=0.01):
        self.ratio = check_ratio(ratio)

    def compress(self, x, seed):
        flat = tf.reshape(x, [-1])
        indices = tf.math.top_k(
            tf.abs(flat), _k(self.ratio, _size(x.shape)), sorted=False
        ).indices
        return [tf.gather(flat, indices), indices]

    def decompress(self, wire, shape, seed):
        return _scatter(wire[1], wire[0], shape)

    def wire_specs(self, shape):
        k = _k(self.ratio, _size(shape))
        return [((k,), tf.float32), ((k,), tf.int32)]

    def get_config(self):
        return {"ratio": self.ratio}


@_register("randomk")
class RandomK(Compressor):
    """k = ⌈ratio·d⌉ coordinates drawn without replacement, scaled by d/k.

    Unbiased. The coordinates come from a seed shared by all replicas (the
    step and the tensor's index), so only the k values travel and they are
    summed by `all_reduce`: 4k bytes.
    """

    # tf.random.experimental.index_shuffle has no XLA kernel.
    jit_compatible = False

    unbiased = True
    summable = True
    shared_randomness = True

    def __init__(self, ratio=0.01):
        self.ratio = check_ratio(ratio)

    def _indices(self, shape, seed):
        d = _size(shape)
        k = _k(self.ratio, d)
        positions = tf.range(k, dtype=tf.int64)
        # index_shuffle mixes its key weakly (nearby seeds give nearby
        # permutations); hash the seed first.
        key = tf.random.experimental.stateless_split(seed, 1)[0]
        return tf.random.experimental.index_shuffle(positions, key, d - 1), d / k

    def compress(self, x, seed):
        indices, scale = self._indices(x.shape, seed)
        return [tf.gather(tf.reshape(x, [-1]), indices) * scale]

    def decompress(self, wire, shape, seed):
        indices, _ = self._indices(shape, seed)
        return _scatter(indices, wire[0], shape)

    def wire_specs(self, shape):
        return [((_k(self.ratio, _size(shape)),), tf.float32)]

    def get_config(self):
        return {"ratio": self.ratio}


@_register("powersgd")
class PowerSGD(Compressor):
    """Rank-r PowerSGD (Vogels, Karimireddy, Jaggi 2019). Biased.

    A tensor is viewed as a matrix M [∏shape[:-1], shape[-1]]. With Q from
    the previous step (warm start): P = M·Q, all_reduce P, orthogonalise P
    (QR), Q = Mᵀ·P, all_reduce Q; the mean is P·Qᵀ/N and this replica's part,
    for error feedback, P·Q_iᵀ. 1-D tensors, and matrices for which r(m + n)
    ≥ m·n, are sent uncompressed in the first round.
    """

    summable = True
    one_round = False

    def __init__(self, rank=4, seed=0):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"`rank` must be an integer >= 1. Received: rank={rank!r}")
        self.rank = rank
        self.seed = int(seed)

    def _matrix(self, shape):
        """(rows, cols, rank), or None when the tensor is sent uncompressed."""
        if len(shape) < 2:
            return None
        rows, cols = _size(shape[:-1]), int(shape[-1])
        rank = min(self.rank, rows, cols)
        if rank * (rows + cols) >= rows * cols:
            return None
        return rows, cols, rank

    def state_shapes(self, shape):
        plan = self._matrix(tuple(shape))
        return [] if plan is None else [(plan[1], plan[2])]

    def initial_state(self, shape, index):
        rng = np.random.default_rng([self.seed, index])
        return [
            rng.standard_normal(s).astype(np.float32) for s in self.state_shapes(shape)
        ]

    def wire_specs(self, shape):
        plan = self._matrix(tuple(shape))
        if plan is None:
            return [(tuple(shape), tf.float32)]
        rows, cols, rank = plan
        return [((rows, rank), tf.float32), ((cols, rank), tf.float32)]

    def reduce(self, channel, tensors, seeds, states, majority_vote=False):
        n = channel.num_replicas
        plans = [self._matrix(tuple(x.shape)) for x in tensors]
        matrices = [
            None if p is None else tf.reshape(x, p[:2]) for x, p in zip(tensors, plans)
        ]
        first = [
            [x] if p is None else [m @ s[0]]
            for x, p, m, s in zip(tensors, plans, matrices, states)
        ]
        first = channel.all_reduce(first)
        bases = [
            None if p is None else tf.linalg.qr(w[0])[0] for w, p in zip(first, plans)
        ]
        second = [
            [] if p is None else [tf.transpose(m) @ b]
            for p, m, b in zip(plans, matrices, bases)
        ]
        summed = channel.all_reduce([w for w in second if w])
        summed = iter(summed)
        aggregates, local, new_states = [], [], []
        for x, p, w1, w2, b, s in zip(tensors, plans, first, second, bases, states):
            if p is None:
                aggregates.append(w1[0] / n)
                local.append(x)
                new_states.append(s)
                continue
            q_sum = next(summed)[0]
            aggregates.append(tf.reshape(b @ tf.transpose(q_sum), x.shape) / n)
            local.append(tf.reshape(b @ tf.transpose(w2[0]), x.shape))
            new_states.append([q_sum / n])
        return aggregates, local, new_states

    def compress(self, x, seed):
        raise NotImplementedError("PowerSGD is a two-round protocol; use reduce()")

    def get_config(self):
        return {"rank": self.rank, "seed": self.seed}
