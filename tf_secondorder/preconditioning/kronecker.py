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
    the variable's, in `plan.factors` order. `per_block(b, result)` may
    rescale block b's result (Shampoo's grafting)."""
    blocks = plan.partitioner.partition(tf.reshape(tensor, plan.merged_shape))
    first = plan.factors[0].index
    out = []
    for b, block in enumerate(blocks):
        per_axis = [None] * block.shape.rank
        for factor in plan.factors_of_block[b]:
            per_axis[factor.axis] = tf.cast(matrices[factor.index - first], block.dtype)
        result = contract(block, per_axis, back)
        out.append(result if per_block is None else per_block(b, result))
    return tf.reshape(plan.partitioner.merge(out), tensor.shape)


def stochastic_round_to_bfloat16(value, seed):
    """Unbiased rounding of float32 to bfloat16: add random low bits, truncate."""
    bits = tf.bitcast(tf.cast(value, tf.float32), tf.int32)
    noise = tf.random.stateless_uniform(
        tf.shape(bits), seed, minval=0, maxval=1 << 16, dtype=tf.int32
    )
    truncated = tf.bitwise.bitwise_and(bits + noise, tf.constant(-(1 << 16), tf.int32))
    return tf.cast(tf.bitcast(truncated, tf.float32), tf.bfloat16)


# -- the same, batched over a group of equal blocks ([B, *shape]) ----------


def batched_gram(blocks, axis):
    """G_(axis) G_(axis)ᵀ of each block of a stack [B, *shape]: [B, n, n]."""
    rank = blocks.shape.rank - 1
    if rank == 1:
        return blocks[:, :, None] * blocks[:, None, :]
    if rank == 2:
        return tf.matmul(blocks, blocks, transpose_a=axis == 1, transpose_b=axis == 0)
    moved = tf.experimental.numpy.moveaxis(blocks, 1 + axis, 1)
    flat = tf.reshape(moved, [tf.shape(blocks)[0], blocks.shape[1 + axis], -1])
    return tf.matmul(flat, flat, transpose_b=True)


def group_blocks(layout, tensors):
    """{variable: its blocks} for the variables in `tensors` ({variable:
    tensor of its shape}) that have factors."""
    blocks = {}
    for variable, tensor in tensors.items():
        plan = layout.plans[variable]
        if plan.factors:
            blocks[variable] = plan.partitioner.partition(
                tf.reshape(tensor, plan.merged_shape)
            )
    return blocks


def present_members(group, blocks):
    """The (position, variable, block) of the group's members in `blocks`."""
    return [
        (k, variable, block)
        for k, (variable, block) in enumerate(group.members)
        if variable in blocks
    ]


def batched_statistics(layout, beta, grads, statistic, step):
    """New statistics {factor index: value in its storage dtype} of the
    variables in `grads` ({variable: gradient}); `statistic(i)` is factor
    i's current value, an n×n tensor in its storage dtype (read only for the
    factors updated). One batched gram per group and axis."""
    blocks = group_blocks(layout, grads)
    updated = {}
    for number, group in enumerate(layout.groups):
        members = present_members(group, blocks)
        if not members:
            continue
        dtype = tf.as_dtype(group.dtype)
        stacked = tf.stack([tf.cast(blocks[v][b], dtype) for _, v, b in members])
        for j, axis in enumerate(group.axes):
            indices = [group.factors[k][j] for k, _, _ in members]
            current = [statistic(i) for i in indices]
            old = tf.stack([tf.cast(c, dtype) for c in current])
            gram = batched_gram(stacked, axis)
            if beta == 1.0:
                new = old + gram
            else:
                new = beta * old + (1.0 - beta) * gram
            stored = current[0].dtype
            if stored == tf.bfloat16:
                seed = tf.stack([step, tf.constant(number * 8 + j, tf.int32)])
                new = stochastic_round_to_bfloat16(new, seed)
            for i, value in zip(indices, tf.unstack(tf.cast(new, stored))):
                updated[i] = value
    return updated
