"""Gradient compressors: the base class, casts and sign compressors.

A compressor turns one replica's tensor into wire tensors of collective-safe
dtypes (float16/bfloat16/float32/int32) and back. `reduce` is the whole
cross-replica protocol for a list of tensors; the default is one round:
compress, then one `all_reduce` of the wires when they can be summed
(`summable`: decompress(Σ wires) = Σ decompress(wires)), otherwise one
`all_gather` and a local decompress-and-average. Compressors with a
different protocol (PowerSGD's two rounds) override `reduce`.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tf_secondorder.distribute import packing

_REGISTRY = {}


def _register(name):
    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return keras.saving.register_keras_serializable(package="tf_secondorder")(cls)

    return wrap


class Compressor:
    """Base class. Subclasses define `compress`, `decompress`, `wire_specs`.

    Class attributes:
        unbiased: E[decompress(compress(x))] = x.
        summable: wires may be summed by `all_reduce` (linear codes).
        sign_based: the code is a sign per element (allows majority vote).
        shared_randomness: every replica must draw the same random numbers
            (the reducer then passes a seed without the replica id).
    """

    name = None
    unbiased = False
    summable = False
    sign_based = False
    shared_randomness = False

    @property
    def error_feedback_default(self):
        """Whether error feedback is on when the user leaves it at None."""
        return not self.unbiased

    def compress(self, x, seed):
        """Wire tensors for a float32 tensor `x`; `seed`: int64 [2]."""
        raise NotImplementedError

    def decompress(self, wire, shape, seed):
        """float32 tensor of `shape` from one replica's (or summed) wire."""
        raise NotImplementedError

    def wire_specs(self, shape):
        """[(shape, dtype)] of the wire tensors for a tensor of `shape`."""
        raise NotImplementedError

    def wire_bytes(self, shape):
        """Exact bytes one replica hands to collectives for a tensor of `shape`."""
        return sum(
            int(np.prod(s, dtype=np.int64)) * tf.as_dtype(d).size
            for s, d in self.wire_specs(tuple(shape))
        )

    def state_shapes(self, shape):
        """Shapes of per-tensor state kept between steps (none by default)."""
        return []

    def initial_state(self, shape, index):
        return [np.zeros(s, np.float32) for s in self.state_shapes(shape)]

    # Whether the one-round protocol below applies (PowerSGD: two rounds).
    one_round = True
    # Whether `compress`/`decompress` use only ops with XLA kernels, so that
    # `encode` and `aggregate` can run as single fused XLA computations.
    jit_compatible = True

    def reduce(self, channel, tensors, seeds, states, majority_vote=False):
        """Mean over replicas of the decompressed tensors (or their vote).

        Returns (aggregates, local decompressions, new states); the local
        decompression is what this replica's wire means, for error feedback.
        """
        wires, local = self.encode(tensors, seeds)
        received = self.communicate(channel, wires, majority_vote)
        shapes = [tuple(x.shape) for x in tensors]
        aggregates = self.aggregate(
            received, shapes, seeds, channel.num_replicas, majority_vote
        )
        return aggregates, local, states

    def encode(self, tensors, seeds):
        """(wires, local decompressions) of a list of tensors; no communication."""
        wires = [self.compress(x, s) for x, s in zip(tensors, seeds)]
        local = [
            self.decompress(w, x.shape, s) for w, x, s in zip(wires, tensors, seeds)
        ]
        return wires, local

    def gathers(self, majority_vote):
        """True when the wires travel by all_gather rather than all_reduce."""
        return majority_vote or not self.summable

    def communicate(self, channel, wires, majority_vote=False):
        if self.gathers(majority_vote):
            return channel.all_gather(wires)
        return channel.all_reduce(wires)

    def aggregate(self, received, shapes, seeds, num_replicas, majority_vote=False):
        """Aggregates from what `communicate` returned (summed or gathered wires)."""
        n = num_replicas
        if not self.gathers(majority_vote):
            return [
                self.decompress(w, shape, s) / n
                for w, shape, s in zip(received, shapes, seeds)
            ]
        aggregates = []
        for wire, shape, seed in zip(received, shapes, seeds):
            decoded = [
                self.decompress([w[r] for w in wire], shape, seed) for r in range(n)
            ]
            if majority_vote:
                votes = tf.add_n([tf.sign(d) for d in decoded])
                aggregates.append(tf.where(votes >= 0, 1.0, -1.0))
            else:
                aggregates.append(tf.add_n(decoded) / n)
        return aggregates

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _size(shape):
    return int(np.prod(shape, dtype=np.int64))


@_register("fp16")
class Float16(Compressor):
    """Cast to float16 (values beyond ±65504 saturate instead of becoming inf).

    Rounding to nearest is deterministic, so it is not unbiased, but its
    relative error (2⁻¹¹) is far below gradient noise: error feedback is off
    by default.
    """

    summable = True
    wire_dtype = tf.float16
    error_feedback_default = False

    def compress(self, x, seed):
        limit = float(self.wire_dtype.max)
        return [tf.cast(tf.clip_by_value(x, -limit, limit), self.wire_dtype)]

    def decompress(self, wire, shape, seed):
        return tf.reshape(tf.cast(wire[0], tf.float32), shape)

    def wire_specs(self, shape):
        return [(shape, self.wire_dtype)]


@_register("bf16")
class BFloat16(Float16):
    """Cast to bfloat16 (8 mantissa bits, float32's range)."""

    wire_dtype = tf.bfloat16


def _signs(x):
    """1 where x < 0, else 0 (sign(0) = +1): one bit per element."""
    return packing.pack_bits(tf.cast(tf.reshape(x, [-1]) < 0, tf.int32), 1)


def _from_signs(words, shape):
    bits = packing.unpack_bits(words, 1, _size(shape))
    return tf.reshape(1.0 - 2.0 * tf.cast(bits, tf.float32), shape)


@_register("sign")
class Sign(Compressor):
    """sign(x) ∈ {−1, +1}, one bit per element (sign(0) = +1). Biased."""

    sign_based = True

    def compress(self, x, seed):
        return [_signs(x)]

    def decompress(self, wire, shape, seed):
        return _from_signs(wire[0], shape)

    def wire_specs(self, shape):
        return [((packing.words_for(_size(shape), 1),), tf.int32)]


@_register("scaled_sign")
class ScaledSign(Compressor):
    """(‖x‖₁/d)·sign(x): one bit per element plus one float. Biased.

    With error feedback this is EF-SignSGD (Karimireddy et al. 2019).
    """

    sign_based = True

    def compress(self, x, seed):
        scale = tf.reshape(tf.reduce_mean(tf.abs(x)), [1])
        return [scale, _signs(x)]

    def decompress(self, wire, shape, seed):
        return wire[0][0] * _from_signs(wire[1], shape)

    def wire_specs(self, shape):
        return [((1,), tf.float32), ((packing.words_for(_size(shape), 1),), tf.int32)]


def get(identifier):
    """A Compressor from None, a name (SPEC §2) or an instance."""
    if identifier is None or isinstance(identifier, Compressor):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, str) and identifier in _REGISTRY:
        return _REGISTRY[identifier]()
    raise ValueError(
        "`compression` must be None, a tfso.compression.Compressor or one of "
        f"{sorted(_REGISTRY)}. Received: compression={identifier!r}"
    )


def names():
    return sorted(_REGISTRY)


def check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(
            f"`ratio` must be a number in (0, 1]. Received: ratio={ratio!r}"
        )
    if not 0 < ratio <= 1 or math.isnan(ratio):
        raise ValueError(f"`ratio` must be in (0, 1]. Received: ratio={ratio!r}")
    return float(ratio)
