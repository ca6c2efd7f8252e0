"""Bit packing into int32 words, the narrowest dtype every collective accepts.

TF 2.21 collectives reject int8/uint8/bool (SPEC §5), so codes of b bits
(b in 1, 2, 4, 8, 16) are packed 32/b to an int32 word, little end first.
"""

import tensorflow as tf

FIELD_WIDTHS = (1, 2, 4, 8, 16)


def words_for(count, bits):
    """Number of int32 words holding `count` codes of `bits` bits."""
    per_word = 32 // bits
    return -(-count // per_word)


def pack_bits(codes, bits):
    """Packs a 1-D tensor of integer codes in [0, 2**bits) into int32 words."""
    if bits not in FIELD_WIDTHS:
        raise ValueError(f"`bits` must be one of {FIELD_WIDTHS}. Received: {bits}")
    per_word = 32 // bits
    codes = tf.cast(tf.reshape(codes, [-1]), tf.int64)
    count = tf.shape(codes, out_type=tf.int64)[0]
    padding = (-count) % per_word
    codes = tf.pad(codes, [[0, padding]])
    codes = tf.reshape(codes, [-1, per_word])
    shifts = tf.constant([bits * j for j in range(per_word)], tf.int64)
    # Fields are disjoint, so their sum is their bitwise or; it is < 2**32.
    words = tf.reduce_sum(tf.bitwise.left_shift(codes, shifts), axis=1)
    return tf.bitcast(tf.cast(words, tf.uint32), tf.int32)


def unpack_bits(words, bits, count):
    """Inverse of `pack_bits`: the first `count` codes, as int32."""
    per_word = 32 // bits
    words = tf.cast(tf.bitcast(tf.reshape(words, [-1]), tf.uint32), tf.int64)
    shifts = tf.constant([bits * j for j in range(per_word)], tf.int64)
    fields = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(words[:, None], shifts), (1 << bits) - 1
    )
    return tf.cast(tf.reshape(fields, [-1])[:count], tf.int32)
