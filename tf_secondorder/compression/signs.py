"""One bit per element: sign and scaled sign."""

import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compression import packing
from tf_secondorder.compression.compressor import Compressor, num_elements, register


def _signs(x):
    """1 where x < 0, else 0 (sign(0) = +1): one bit per element."""
    return packing.pack_bits(tf.cast(tf.reshape(x, [-1]) < 0, tf.int32), 1)


def _from_signs(words, shape):
    bits = packing.unpack_bits(words, 1, num_elements(shape))
    return tf.reshape(1.0 - 2.0 * tf.cast(bits, tf.float32), shape)


@register("sign")
class Sign(Compressor):
    """sign(x) ∈ {−1, +1}, one bit per element (sign(0) = +1). Biased."""

    sign_based = True
    carries_magnitude = False

    def encode(self, x, seed):
        return [_signs(x)]

    def decode(self, wire, shape, seed):
        return _from_signs(wire[0], shape)

    def wire_specs(self, shape):
        return [((packing.words_for(num_elements(shape), 1),), tf.int32)]


@register("scaled_sign")
class ScaledSign(Compressor):
    """(‖x_b‖₁/|b|)·sign(x) per bucket b: one bit per element plus one float
    per bucket. Biased.

    With error feedback this is EF-SignSGD (Karimireddy et al. 2019); with
    buckets, the block-sign compressor of COMP-AMS (Li et al. 2022), whose
    scales follow the gradient's magnitude across a tensor.

    Args:
        bucket_size: elements sharing one scale, a multiple of 32 (whole
            int32 words of signs), or `None` for one scale per tensor.
            Defaults to `None`.
    """

    sign_based = True

    def __init__(self, bucket_size=None):
        self.bucket_size = validation.integer(
            "bucket_size", bucket_size, 32, optional=True
        )
        if self.bucket_size is not None and self.bucket_size % 32:
            validation.fail("bucket_size", "a multiple of 32 or None", bucket_size)

    def _buckets(self, shape):
        d = num_elements(shape)
        if self.bucket_size is None or self.bucket_size >= d:
            return 1, d
        return -(-d // self.bucket_size), self.bucket_size

    def encode(self, x, seed):
        count, size = self._buckets(x.shape)
        flat = tf.reshape(x, [-1])
        d = num_elements(x.shape)
        if count == 1:
            scales = tf.reshape(tf.reduce_mean(tf.abs(flat)), [1])
        else:
            # The last bucket's mean is over its own elements only.
            padded = tf.reshape(
                tf.pad(tf.abs(flat), [[0, count * size - d]]), [count, size]
            )
            lengths = tf.constant(
                [size] * (count - 1) + [d - size * (count - 1)], tf.float32
            )
            scales = tf.reduce_sum(padded, axis=1) / lengths
        return [scales, _signs(x)]

    def decode(self, wire, shape, seed):
        count, size = self._buckets(shape)
        signs = _from_signs(wire[1], (num_elements(shape),))
        if count == 1:
            return wire[0][0] * tf.reshape(signs, shape)
        scale = tf.repeat(wire[0], size)[: num_elements(shape)]
        return tf.reshape(scale * signs, shape)

    def wire_specs(self, shape):
        count, _ = self._buckets(shape)
        return [
            ((count,), tf.float32),
            ((packing.words_for(num_elements(shape), 1),), tf.int32),
        ]

    def get_config(self):
        return {"bucket_size": self.bucket_size}
