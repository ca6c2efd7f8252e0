"""Casts to 16-bit floats: half the bytes, summable by an all-reduce."""

import tensorflow as tf

from tf_secondorder.compression.compressor import Compressor, register


@register("fp16")
class Float16(Compressor):
    """Cast to float16 (values beyond ±65504 saturate instead of becoming inf).

    Rounding to nearest is deterministic, so it is not unbiased, but its
    relative error (2⁻¹¹) is far below gradient noise: error feedback is off
    by default.
    """

    summable = True
    wire_dtype = tf.float16
    error_feedback_default = False

    def encode(self, x, seed):
        limit = float(self.wire_dtype.max)
        return [tf.cast(tf.clip_by_value(x, -limit, limit), self.wire_dtype)]

    def decode(self, wire, shape, seed):
        return tf.reshape(tf.cast(wire[0], tf.float32), shape)

    def wire_specs(self, shape):
        return [(shape, self.wire_dtype)]


@register("bf16")
class BFloat16(Float16):
    """Cast to bfloat16 (8 mantissa bits, float32's range).

    Collectives on CPU gather no bfloat16 (only all-reduce it), so aggregators
    that gather wires reject it.
    """

    wire_dtype = tf.bfloat16
