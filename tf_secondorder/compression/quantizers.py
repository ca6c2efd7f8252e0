"""Unbiased stochastic quantizers: QSGD, TernGrad, natural compression."""

import numpy as np
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compression import packing
from tf_secondorder.compression.compressor import Compressor, num_elements, register


def _uniform(shape, seed):
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)


@register("qsgd")
class QSGD(Compressor):
    """QSGD (Alistarh et al. 2017) with s = 2^(bits−1) − 1 levels per bucket.

    For each bucket b of `bucket_size` elements,
    q_i = ‖b‖₂ · sign(b_i) · ξ_i / s with ξ_i = ⌊s·|b_i|/‖b‖₂ + u_i⌋, u_i ~ U[0, 1):
    unbiased. Wire: one float32 norm per bucket and a `bits`-bit code
    (sign + level) per element, packed into int32.

    Args:
        bits: code width, one of 2, 4, 8, 16. Defaults to 8 (127 levels).
        bucket_size: elements sharing one norm; `None` = the whole tensor.
            Defaults to 512 (variance ≤ min(B/s², √B/s)·‖b‖², Alistarh Lemma 3.1).
    """

    unbiased = True

    def __init__(self, bits=8, bucket_size=512):
        self.bits = validation.choice("bits", bits, (2, 4, 8, 16))
        self.bucket_size = validation.integer(
            "bucket_size", bucket_size, 1, optional=True
        )
        self.levels = 2 ** (self.bits - 1) - 1

    def _buckets(self, shape):
        d = num_elements(shape)
        bucket = d if self.bucket_size is None else min(self.bucket_size, d)
        return -(-d // bucket), bucket

    def variance_bound(self, shape):
        """min(B/s², √B/s) for buckets of B elements (Alistarh Lemma 3.1)."""
        _, bucket = self._buckets(shape)
        return min(bucket / self.levels**2, np.sqrt(bucket) / self.levels)

    def encode(self, x, seed):
        count, size = self._buckets(x.shape)
        flat = tf.reshape(x, [-1])
        flat = tf.pad(flat, [[0, count * size - num_elements(x.shape)]])
        buckets = tf.reshape(flat, [count, size])
        norms = tf.norm(buckets, axis=1)
        scaled = (
            self.levels * tf.abs(buckets) / tf.where(norms > 0, norms, 1.0)[:, None]
        )
        level = tf.floor(scaled + _uniform([count, size], seed))
        level = tf.clip_by_value(level, 0.0, float(self.levels))
        codes = tf.cast(level, tf.int32) * 2 + tf.cast(buckets < 0, tf.int32)
        return [norms, packing.pack_bits(codes, self.bits)]

    def decode(self, wire, shape, seed):
        count, size = self._buckets(shape)
        codes = tf.reshape(
            packing.unpack_bits(wire[1], self.bits, count * size), [count, size]
        )
        sign = 1.0 - 2.0 * tf.cast(codes % 2, tf.float32)
        level = tf.cast(codes // 2, tf.float32)
        values = wire[0][:, None] * sign * level / self.levels
        return tf.reshape(tf.reshape(values, [-1])[: num_elements(shape)], shape)

    def wire_specs(self, shape):
        count, size = self._buckets(shape)
        return [
            ((count,), tf.float32),
            ((packing.words_for(count * size, self.bits),), tf.int32),
        ]

    def get_config(self):
        return {"bits": self.bits, "bucket_size": self.bucket_size}


@register("terngrad")
class TernGrad(Compressor):
    """TernGrad (Wen et al. 2017): s·{−1, 0, 1}, s = max|x|, P(±1) = |x_i|/s.

    Unbiased without clipping. With `clip` = c, x is first clipped to ±c·σ
    (the paper uses 2.5), which lowers the variance but biases the result.
    Wire: one float32 scale and 2 bits per element.
    """

    def __init__(self, clip=None):
        self.clip = validation.number("clip", clip, 0.0, low_open=True, optional=True)

    @property
    def unbiased(self):
        return self.clip is None

    def variance_bound(self, shape):
        """Unclipped: E‖C(x) − x‖² = s‖x‖₁ − ‖x‖² ≤ (√d − 1)‖x‖², as
        s = max|x| ≤ ‖x‖₂ and ‖x‖₁ ≤ √d‖x‖₂."""
        if self.clip is not None:
            return None
        return float(np.sqrt(num_elements(shape))) - 1.0

    def encode(self, x, seed):
        flat = tf.reshape(x, [-1])
        if self.clip is not None:
            limit = self.clip * tf.math.reduce_std(flat)
            flat = tf.clip_by_value(flat, -limit, limit)
        scale = tf.reduce_max(tf.abs(flat))
        keep = _uniform(tf.shape(flat), seed) * scale < tf.abs(flat)
        codes = tf.where(keep, tf.where(flat < 0, 2, 1), 0)
        return [tf.reshape(scale, [1]), packing.pack_bits(codes, 2)]

    def decode(self, wire, shape, seed):
        codes = packing.unpack_bits(wire[1], 2, num_elements(shape))
        ternary = tf.cast(codes == 1, tf.float32) - tf.cast(codes == 2, tf.float32)
        return tf.reshape(wire[0][0] * ternary, shape)

    def wire_specs(self, shape):
        return [
            ((1,), tf.float32),
            ((packing.words_for(num_elements(shape), 2),), tf.int32),
        ]

    def get_config(self):
        return {"clip": self.clip}


def _exponent_and_fraction(magnitude):
    """For float32 m > 0: (e, f) with m = 2^e·(1 + f), f ∈ [0, 1); subnormals give e = −127."""
    bits = tf.bitcast(magnitude, tf.int32)
    biased = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 23), 0xFF)
    fraction = tf.cast(tf.bitwise.bitwise_and(bits, 0x7FFFFF), tf.float32) / 2.0**23
    return biased, fraction


@register("natural")
class Natural(Compressor):
    """Natural compression (Horváth et al. 2019) or natural dithering.

    `levels=None`: each x is rounded to one of the two powers of two around
    it, up with probability (|x| − 2^e)/2^e: unbiased, second moment at most
    9/8 of x²; wire: a sign bit and the 8-bit float32 exponent per element
    (subnormals round to 0 or 2^−126, still unbiased).

    `levels=s`: natural dithering: |x_i|/‖x‖₂ is rounded stochastically onto
    {0, 2^(1−s), ..., 1/2, 1}; wire: the norm plus a sign and a level code
    per element, in the narrowest packable field.
    """

    unbiased = True

    def __init__(self, levels=None):
        self.levels = validation.integer("levels", levels, 1, 127, optional=True)
        if levels is not None:
            needed = 1 + int(np.ceil(np.log2(levels + 1)))
            self.bits = min(b for b in packing.FIELD_WIDTHS if b >= needed)

    def variance_bound(self, shape):
        """1/8 for natural compression (Horváth et al., Theorem 1); none
        declared for dithering."""
        return 1.0 / 8.0 if self.levels is None else None

    def encode(self, x, seed):
        flat = tf.reshape(x, [-1])
        u = _uniform(tf.shape(flat), seed)
        if self.levels is None:
            return self._compress_natural(flat, u)
        return self._compress_dithering(flat, u)

    def _compress_natural(self, flat, u):
        biased, fraction = _exponent_and_fraction(tf.abs(flat))
        subnormal_fraction = tf.abs(flat) / 2.0**-126
        up = tf.where(biased == 0, u < subnormal_fraction, u < fraction)
        exponent = tf.where(
            biased == 0xFF, biased, tf.minimum(biased + tf.cast(up, tf.int32), 254)
        )
        return [
            packing.pack_bits(exponent, 8),
            packing.pack_bits(tf.cast(flat < 0, tf.int32), 1),
        ]

    def _compress_dithering(self, flat, u):
        s = self.levels
        norm = tf.norm(flat)
        ratio = tf.abs(flat) / tf.where(norm > 0, norm, 1.0)
        biased, fraction = _exponent_and_fraction(ratio)
        floor_level = tf.cast(
            biased - 127 + s, tf.float32
        )  # ratio ∈ [2^e, 2^(e+1)): level e + s
        smallest = 2.0 ** (1 - s)
        low_range = ratio < smallest
        level = tf.where(
            low_range,
            tf.where(u < ratio / smallest, 1.0, 0.0),
            floor_level + tf.cast(u < fraction, tf.float32),
        )
        level = tf.clip_by_value(level, 0.0, float(s))
        codes = tf.cast(level, tf.int32) * 2 + tf.cast(flat < 0, tf.int32)
        return [tf.reshape(norm, [1]), packing.pack_bits(codes, self.bits)]

    def decode(self, wire, shape, seed):
        d = num_elements(shape)
        if self.levels is None:
            exponent = packing.unpack_bits(wire[0], 8, d)
            sign = packing.unpack_bits(wire[1], 1, d)
            bits = tf.bitwise.bitwise_or(
                tf.bitwise.left_shift(sign, 31), tf.bitwise.left_shift(exponent, 23)
            )
            return tf.reshape(tf.bitcast(bits, tf.float32), shape)
        codes = packing.unpack_bits(wire[1], self.bits, d)
        level = codes // 2
        magnitude = tf.where(
            level > 0, tf.pow(2.0, tf.cast(level - self.levels, tf.float32)), 0.0
        )
        sign = 1.0 - 2.0 * tf.cast(codes % 2, tf.float32)
        return tf.reshape(wire[0][0] * sign * magnitude, shape)

    def wire_specs(self, shape):
        d = num_elements(shape)
        if self.levels is None:
            return [
                ((packing.words_for(d, 8),), tf.int32),
                ((packing.words_for(d, 1),), tf.int32),
            ]
        return [((1,), tf.float32), ((packing.words_for(d, self.bits),), tf.int32)]

    def get_config(self):
        return {"levels": self.levels}


@register("int8")
class Int8(Compressor):
    """Linear `bits`-bit integers per bucket, scaled by the bucket's largest
    magnitude, with stochastic rounding: unbiased.

    For a bucket b with s = max|b_i| and L = 2^(bits−1) − 1 levels,
    q_i = s · ⌊L·b_i/s + u_i⌋ / L, u_i ~ U[0, 1). Unlike QSGD, whose scale is
    the bucket's L2 norm, every level is within the bucket's range, so dense
    tensors (pseudo-gradients of local SGD / DiLoCo) keep ~bits of precision.
    Wire: one float32 scale per bucket and `bits` bits per element.

    Args:
        bits: 4 or 8. Defaults to 8 (`"int8"`); `"int4"` is 4.
        bucket_size: elements sharing one scale, >= 1. Defaults to 256.
    """

    unbiased = True
    default_bits = 8

    def __init__(self, bits=None, bucket_size=256):
        bits = self.default_bits if bits is None else bits
        self.bits = validation.choice("bits", bits, (4, 8))
        self.bucket_size = validation.integer("bucket_size", bucket_size, 1)
        self.levels = 2 ** (self.bits - 1) - 1

    def _buckets(self, shape):
        d = num_elements(shape)
        bucket = min(self.bucket_size, d)
        return -(-d // bucket), bucket

    def variance_bound(self, shape):
        """B/(4L²): each element's rounding variance is at most (s/L)²/4 with
        s = max|b_i| ≤ ‖b‖₂, over a bucket of B elements."""
        _, bucket = self._buckets(shape)
        return bucket / (4.0 * self.levels**2)

    def encode(self, x, seed):
        count, size = self._buckets(x.shape)
        flat = tf.pad(tf.reshape(x, [-1]), [[0, count * size - num_elements(x.shape)]])
        buckets = tf.reshape(flat, [count, size])
        scales = tf.reduce_max(tf.abs(buckets), axis=1)
        safe = tf.where(scales > 0, scales, 1.0)[:, None]
        level = tf.floor(self.levels * buckets / safe + _uniform([count, size], seed))
        level = tf.clip_by_value(level, -self.levels, self.levels)
        codes = tf.cast(level, tf.int32) + self.levels
        return [scales, packing.pack_bits(codes, self.bits)]

    def decode(self, wire, shape, seed):
        count, size = self._buckets(shape)
        codes = packing.unpack_bits(wire[1], self.bits, count * size)
        level = tf.cast(tf.reshape(codes, [count, size]) - self.levels, tf.float32)
        values = wire[0][:, None] * level / self.levels
        return tf.reshape(tf.reshape(values, [-1])[: num_elements(shape)], shape)

    def wire_specs(self, shape):
        count, size = self._buckets(shape)
        return [
            ((count,), tf.float32),
            ((packing.words_for(count * size, self.bits),), tf.int32),
        ]

    def get_config(self):
        return {"bits": self.bits, "bucket_size": self.bucket_size}


@register("int4")
class Int4(Int8):
    """`Int8` with 4-bit integers (7 levels each side)."""

    default_bits = 4
