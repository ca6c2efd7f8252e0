"""A symmetric matrix stored once: its upper triangle, row by row.

n(n+1)/2 numbers instead of n², for statistics that are Gram matrices.
Packing and unpacking are gathers with indices fixed by n, so they cost one
pass over the matrix and work on a stack [..., n, n] / [..., n(n+1)/2].
"""

import functools

import numpy as np
import tensorflow as tf


def packed_size(n):
    """Numbers stored for an n×n symmetric matrix."""
    return n * (n + 1) // 2


@functools.cache
def _upper_positions(n):
    """Flat positions i·n + j of the upper triangle (i <= j), row by row."""
    rows, cols = np.triu_indices(n)
    return (rows * n + cols).astype(np.int32)


@functools.cache
def _packed_positions(n):
    """[n, n]: where entry (i, j) = (j, i) lives in the packed vector."""
    positions = np.zeros((n, n), np.int32)
    rows, cols = np.triu_indices(n)
    positions[rows, cols] = np.arange(len(rows))
    positions[cols, rows] = np.arange(len(rows))
    return positions


def pack_symmetric(matrix):
    """The upper triangle of `matrix` ([..., n, n]) as [..., n(n+1)/2]."""
    n = matrix.shape[-1]
    flat = tf.reshape(matrix, tf.concat([tf.shape(matrix)[:-2], [n * n]], 0))
    return tf.gather(flat, _upper_positions(n), axis=-1)


def unpack_symmetric(packed, n):
    """The n×n symmetric matrix ([..., n, n]) whose upper triangle is `packed`."""
    return tf.gather(packed, _packed_positions(n), axis=-1)
