"""Bit packing into int32 words, the narrowest dtype every collective accepts.

TF 2.21 collectives reject int8/uint8/bool, so codes of b bits
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
        raise ValueError(
            f"`bits` must be one of {list(FIELD_WIDTHS)}; received {bits!r}"
        )
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


def to_words(tensor):
    """`tensor` of any collective-safe dtype as flat int32 words, for collectives
    that move bits without arithmetic (gathers). 16-bit values go two to a
    word (padded with one zero value when odd), 64-bit values take two words.
    """
    flat = tf.reshape(tensor, [-1])
    width = flat.dtype.size
    if width == 4:
        return tf.bitcast(flat, tf.int32)
    if width == 2:
        flat = tf.pad(flat, [[0, tf.size(flat) % 2]])
        return tf.bitcast(tf.reshape(flat, [-1, 2]), tf.int32)
    if width == 8:
        return tf.reshape(tf.bitcast(flat, tf.int32), [-1])
    raise ValueError(
        f"`tensor` must have a 16, 32 or 64-bit dtype; received {flat.dtype}"
    )


def word_count(count, dtype):
    """Number of int32 words `to_words` makes of `count` values of `dtype`."""
    width = tf.as_dtype(dtype).size
    return {2: -(-count // 2), 4: count, 8: 2 * count}[width]


def from_words(words, shape, dtype):
    """Inverse of `to_words`: the tensor of `shape` and `dtype`."""
    dtype = tf.as_dtype(dtype)
    count = 1
    for d in shape:
        count *= int(d)
    if dtype.size == 4:
        flat = tf.bitcast(words, dtype)
    elif dtype.size == 2:
        flat = tf.reshape(tf.bitcast(words, dtype), [-1])[:count]
    else:
        flat = tf.bitcast(tf.reshape(words, [-1, 2]), dtype)
    return tf.reshape(flat, shape)
