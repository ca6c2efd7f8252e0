"""Kronecker-factored statistics and contractions shared by Shampoo and SOAP.

For a block G of order k, the statistic of axis i is G_(i) G_(i)ᵀ, where
G_(i) is G unfolded along axis i. A block is preconditioned (Shampoo) or
rotated into a basis (SOAP) by contracting each axis with a matrix:
`contract(G, [M_1, ..., M_k])` is G ×_1 M_1ᵀ ×_2 M_2ᵀ ... (for a matrix,
M_1ᵀ·G·M_2), and `back=True` contracts with M_i instead (M_1·G·M_2ᵀ).

Pure tensor functions: no Keras, no variables.
"""

import tensorflow as tf


def gram(block, axis):
    """G_(axis) G_(axis)ᵀ: the block unfolded along `axis`, times its transpose."""
    rank = block.shape.rank
    if rank == 1:
        return block[:, None] * block[None, :]
    if rank == 2:
        return tf.matmul(block, block, transpose_a=axis == 1, transpose_b=axis == 0)
    others = [a for a in range(rank) if a != axis]
    return tf.tensordot(block, block, axes=[others, others])


def contract(block, matrices, back=False):
    """Contracts axis i of `block` with matrices[i] (None: axis left alone)."""
    rank = block.shape.rank
    if rank == 1:
        (matrix,) = matrices
        if matrix is None:
            return block
        return tf.linalg.matvec(matrix, block, transpose_a=not back)
    if rank == 2:
        left, right = matrices
        if left is not None:
            block = tf.matmul(left, block, transpose_a=not back)
        if right is not None:
            block = tf.matmul(block, right, transpose_b=back)
        return block
    # Contracting axis 0 appends the new axis last, so after `rank`
    # contractions (or rotations, for axes left alone) the order is back.
    for matrix in matrices:
        if matrix is None:
            block = tf.transpose(block, list(range(1, rank)) + [0])
        else:
            block = tf.tensordot(block, matrix, axes=[[0], [1 if back else 0]])
    return block


def contract_variable(plan, tensor, matrices, back=False, per_block=None):
    """`tensor` (a variable's shape) contracted block by block; `matrices` are
    the variable's, in `plan.factors` order. `per_block(b, result, block)`
    may rescale each block's result (grafting)."""
    blocks = plan.partitioner.partition(tf.reshape(tensor, plan.merged_shape))
    first = plan.factors[0].index
    out = []
    for b, block in enumerate(blocks):
        per_axis = [None] * block.shape.rank
        for factor in plan.factors_of_block[b]:
            per_axis[factor.axis] = tf.cast(matrices[factor.index - first], block.dtype)
        result = contract(block, per_axis, back)
        out.append(result if per_block is None else per_block(b, result, block))
    return tf.reshape(plan.partitioner.merge(out), tensor.shape)


def stochastic_round_to_bfloat16(value, seed):
    """Unbiased rounding of float32 to bfloat16: add random low bits, truncate."""
    bits = tf.bitcast(tf.cast(value, tf.float32), tf.int32)
    noise = tf.random.stateless_uniform(
        tf.shape(bits), seed, minval=0, maxval=1 << 16, dtype=tf.int32
    )
    truncated = tf.bitwise.bitwise_and(bits + noise, tf.constant(-(1 << 16), tf.int32))
    return tf.cast(tf.bitcast(truncated, tf.float32), tf.bfloat16)


def updated_statistics(plan, beta, grad, statistics, step):
    """New values of one variable's statistics, in their storage dtypes:
    S ← β·S + (1 − β)·G_(i) G_(i)ᵀ (β = 1: a plain sum). bfloat16 storage is
    rounded stochastically, so small EMA increments are not lost."""
    dtype = tf.as_dtype(plan.factors[0].dtype)
    blocks = plan.partitioner.partition(
        tf.reshape(tf.cast(grad, dtype), plan.merged_shape)
    )
    updated = []
    for factor, stored in zip(plan.factors, statistics):
        old = tf.cast(stored, dtype)
        g = gram(blocks[factor.block], factor.axis)
        if beta == 1.0:
            new = old + g
        else:
            b = tf.constant(beta, dtype)
            new = b * old + (1.0 - b) * g
        if stored.dtype == tf.bfloat16:
            seed = tf.stack([step, tf.constant(factor.index, tf.int32)])
            new = stochastic_round_to_bfloat16(new, seed)
        updated.append(tf.cast(new, stored.dtype))
    return updated
