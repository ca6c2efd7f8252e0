"""Sparsifying compressors: top-k and random-k."""

import math

import tensorflow as tf

from tf_secondorder.compression.compressor import (
    Compressor,
    check_ratio,
    num_elements,
    register,
)


def _k(ratio, d):
    return max(1, min(d, math.ceil(ratio * d)))


def _scatter(indices, values, shape):
    d = num_elements(shape)
    dense = tf.scatter_nd(tf.reshape(indices, [-1, 1]), values, [d])
    return tf.reshape(dense, shape)


@register("topk")
class TopK(Compressor):
    """The k = ⌈ratio·d⌉ entries of largest magnitude, with their indices. Biased.

    Wire: k float32 values and k int32 indices (8k bytes); indices differ
    between replicas, so wires are all-gathered.
    """

    def __init__(self, ratio=0.01):
        self.ratio = check_ratio(ratio)

    def encode(self, x, seed):
        flat = tf.reshape(x, [-1])
        indices = tf.math.top_k(
            tf.abs(flat), _k(self.ratio, num_elements(x.shape)), sorted=False
        ).indices
        return [tf.gather(flat, indices), indices]

    def decode(self, wire, shape, seed):
        return _scatter(wire[1], wire[0], shape)

    def wire_specs(self, shape):
        k = _k(self.ratio, num_elements(shape))
        return [((k,), tf.float32), ((k,), tf.int32)]

    def get_config(self):
        return {"ratio": self.ratio}


@register("randomk")
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
        d = num_elements(shape)
        k = _k(self.ratio, d)
        positions = tf.range(k, dtype=tf.int64)
        # index_shuffle mixes its key weakly (nearby seeds give nearby
        # permutations); hash the seed first.
        key = tf.random.experimental.stateless_split(seed, 1)[0]
        return tf.random.experimental.index_shuffle(positions, key, d - 1), d / k

    def encode(self, x, seed):
        indices, scale = self._indices(x.shape, seed)
        return [tf.gather(tf.reshape(x, [-1]), indices) * scale]

    def decode(self, wire, shape, seed):
        indices, _ = self._indices(shape, seed)
        return _scatter(indices, wire[0], shape)

    def wire_specs(self, shape):
        return [((_k(self.ratio, num_elements(shape)),), tf.float32)]

    def get_config(self):
        return {"ratio": self.ratio}
