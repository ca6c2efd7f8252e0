"""Kronecker-factored statistics and contractions shared by Shampoo and SOAP,
on stacks of equal blocks ([B, *block_shape], one stack per layout group).

For a block G of order k, the statistic of axis i is G_(i) G_(i)ᵀ, where
G_(i) is G unfolded along axis i. A block is preconditioned (Shampoo) or
rotated into a basis (SOAP) by contracting each axis with a matrix:
`contract(G, [M_1, ..., M_k])` is G ×_1 M_1ᵀ ×_2 M_2ᵀ ... (for a matrix,
M_1ᵀ·G·M_2), and `back=True` contracts with M_i instead (M_1·G·M_2ᵀ); every
block of a stack with its own matrices ([B, n, n] per axis).

Pure tensor functions: no Keras, no variables.
"""

import tensorflow as tf


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


def contract(blocks, matrices, back=False):
    """Contracts axis i of every block of `blocks` ([B, *shape]) with its
    matrices[i] ([B, n_i, n_i]; None: axis left alone)."""
    rank = blocks.shape.rank - 1
    if rank == 1:
        (matrix,) = matrices
        if matrix is None:
            return blocks
        return tf.linalg.matvec(matrix, blocks, transpose_a=not back)
    if rank == 2:
        left, right = matrices
        if left is not None:
            blocks = tf.matmul(left, blocks, transpose_a=not back)
        if right is not None:
            blocks = tf.matmul(blocks, right, transpose_b=back)
        return blocks
    for axis, matrix in enumerate(matrices):
        if matrix is None:
            continue
        moved = tf.experimental.numpy.moveaxis(blocks, 1 + axis, -1)
        shape = tf.shape(moved)
        flat = tf.reshape(moved, [shape[0], -1, moved.shape[-1]])
        flat = tf.matmul(flat, matrix, transpose_b=back)
        blocks = tf.experimental.numpy.moveaxis(tf.reshape(flat, shape), -1, 1 + axis)
    return blocks


def block_norms(blocks):
    """‖G‖_F of each block of a stack: [B]."""
    # One pass per block (sum of squares), then a square root per block.
    axes = list(range(1, blocks.shape.rank))
    return tf.sqrt(tf.reduce_sum(tf.square(blocks), axis=axes))


def per_block(scale, blocks):
    """Multiplies block b of the stack by scale[b]."""
    return blocks * tf.reshape(scale, [-1] + [1] * (blocks.shape.rank - 1))


def to_stacks(layout, tensors, dtype=None):
    """{group: [B, *shape]} of the tensors in `tensors` ({variable: tensor
    of its shape}), and {group: [B] bool mask of the rows present} for the
    groups some of whose members are missing (their rows are zeros)."""
    pieces = {}
    for variable, tensor in tensors.items():
        plan = layout.plans[variable]
        if not plan.members:
            continue
        stacks = plan.partitioner.partition(tf.reshape(tensor, plan.merged_shape))
        for r, stack in enumerate(stacks):
            group, member = plan.members[r]
            if dtype is not None:
                stack = tf.cast(stack, dtype)
            pieces.setdefault(group, {})[member.offset] = stack
    out, masks = {}, {}
    for number, present in pieces.items():
        group = layout.groups[number]
        parts, mask = [], []
        for member in group.members:
            if member.offset in present:
                parts.append(present[member.offset])
                mask += [True] * member.count
            else:
                like = next(iter(present.values()))
                parts.append(tf.zeros([member.count, *group.shape], like.dtype))
                mask += [False] * member.count
        out[number] = parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)
        if not all(mask):
            masks[number] = tf.constant(mask)
    return out, masks


def from_stacks(layout, stacks, variables, shapes):
    """{variable: tensor of shape shapes[variable]} for `variables` (all with
    factors) from group stacks ({group: [B, *shape]}), the inverse of
    `to_stacks`."""
    out = {}
    for variable in variables:
        plan = layout.plans[variable]
        pieces = []
        for r in range(len(plan.partitioner.regions)):
            number, member = plan.members[r]
            stack = stacks[number]
            if member.count != layout.groups[number].count:
                stack = stack[member.offset : member.offset + member.count]
            pieces.append(stack)
        out[variable] = tf.reshape(plan.partitioner.merge(pieces), shapes[variable])
    return out


def stochastic_round_to_bfloat16(value, seed):
    """Unbiased rounding of float32 to bfloat16: add random low bits, truncate."""
    bits = tf.bitcast(tf.cast(value, tf.float32), tf.int32)
    noise = tf.random.stateless_uniform(
        tf.shape(bits), seed, minval=0, maxval=1 << 16, dtype=tf.int32
    )
    truncated = tf.bitwise.bitwise_and(bits + noise, tf.constant(-(1 << 16), tf.int32))
    return tf.cast(tf.bitcast(truncated, tf.float32), tf.bfloat16)


def batched_statistics(layout, beta, grads, statistic, step):
    """New statistics {slot: [rows, n, n] in its storage dtype} of the groups
    that `grads` ({variable: gradient}) reach; `statistic(slot)` is a slot's
    current value, [rows, n, n] in its storage dtype. One batched gram per
    slot; rows of members without a gradient keep their value."""
    stacks, masks = to_stacks(layout, grads)
    updated = {}
    weights = {}  # dtype -> (beta, 1 - beta), made once per dtype
    for number, blocks in stacks.items():
        group = layout.groups[number]
        dtype = tf.as_dtype(group.dtype)
        if dtype not in weights:
            weights[dtype] = (tf.constant(beta, dtype), tf.constant(1.0 - beta, dtype))
        blocks = tf.cast(blocks, dtype)
        for slot in group.slots:
            axis = layout.slots[slot].axis
            current = statistic(slot)
            old = tf.cast(current, dtype)
            gram = batched_gram(blocks, axis)
            if beta == 1.0:
                new = old + gram
            else:
                new = weights[dtype][0] * old + weights[dtype][1] * gram
            if current.dtype == tf.bfloat16:
                seed = tf.stack([step, tf.constant(slot, tf.int32)])
                new = stochastic_round_to_bfloat16(new, seed)
            new = tf.cast(new, current.dtype)
            if number in masks:
                new = tf.where(masks[number][:, None, None], new, current)
            updated[slot] = new
    return updated
