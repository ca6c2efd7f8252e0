"""Shampoo's per-step arithmetic for one variable, as pure tensor functions.

Variables are read before and assigned after these calls, so they hold no
state and run the same under any tf.distribute strategy, inside
`compile(jit_compile=True)` (where XLA fuses them) or not. They are not
XLA-compiled on their own: on CPU that measured slower on T1 (the work is
matmul-bound and XLA's matmul is no faster than oneDNN's) and added seconds of
compilation for every variable shape.

No Keras here: every input is a tensor, every hyper-parameter a Python value
in `Hyper`; the caller guards against non-finite gradients.
"""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Hyper:
    beta1: float
    beta2: float
    grafting: object
    grafting_epsilon: float
    nesterov: bool
    start_step: int
    bfloat16_statistics: bool


def all_finite(tensor):
    return tf.reduce_all(tf.math.is_finite(tensor))


def gram(block, axis):
    """G_(axis) G_(axis)ᵀ: the block unfolded along `axis`, times its transpose."""
    rank = block.shape.rank
    if rank == 1:
        return block[:, None] * block[None, :]
    if rank == 2:
        return tf.matmul(block, block, transpose_a=axis == 1, transpose_b=axis == 0)
    others = [a for a in range(rank) if a != axis]
    return tf.tensordot(block, block, axes=[others, others])


def precondition(block, factors):
    """Contracts mode i of `block` with the symmetric matrix factors[i] (or not)."""
    rank = block.shape.rank
    if rank == 1:
        return tf.linalg.matvec(factors[0], block) if factors[0] is not None else block
    if rank == 2:
        left, right = factors
        if left is not None:
            block = tf.matmul(left, block)
        if right is not None:
            block = tf.matmul(block, right)
        return block
    # Contracting axis 0 each time appends the new axis last, so after `rank`
    # contractions (or rotations, for unpreconditioned axes) the order is back.
    for factor in factors:
        if factor is None:
            block = tf.transpose(block, list(range(1, rank)) + [0])
        else:
            block = tf.tensordot(block, factor, axes=[[0], [0]])
    return block


def stochastic_round_to_bfloat16(value, seed):
    """Unbiased rounding of float32 to bfloat16: add random low bits, truncate."""
    bits = tf.bitcast(tf.cast(value, tf.float32), tf.int32)
    noise = tf.random.stateless_uniform(
        tf.shape(bits), seed, minval=0, maxval=1 << 16, dtype=tf.int32
    )
    truncated = tf.bitwise.bitwise_and(bits + noise, tf.constant(-(1 << 16), tf.int32))
    return tf.cast(tf.bitcast(truncated, tf.float32), tf.bfloat16)


def updated_statistics(plan, hyper, grad, statistics, step):
    """New values of the statistics of one variable, in their storage dtypes."""
    dtype = tf.as_dtype(plan.factors[0].dtype)
    grad = tf.cast(grad, dtype)
    blocks = plan.partitioner.partition(tf.reshape(grad, plan.merged_shape))
    updated = []
    for factor, stored in zip(plan.factors, statistics):
        old = tf.cast(stored, dtype)
        g = gram(blocks[factor.block], factor.axis)
        if hyper.beta2 == 1.0:
            new = old + g
        else:
            beta2 = tf.constant(hyper.beta2, dtype)
            new = beta2 * old + (1.0 - beta2) * g
        if hyper.bfloat16_statistics:
            seed = tf.stack([step, tf.constant(factor.index, tf.int32)])
            new = stochastic_round_to_bfloat16(new, seed)
        updated.append(tf.cast(new, stored.dtype))
    return updated


def update(plan, hyper, grad, accumulator, momentum, preconditioners, step, lr):
    """(new accumulator, new momentum, delta) of one variable; the caller
    subtracts delta. `accumulator` / `momentum` are None when the grafting
    type or beta1 needs none, and so are the returned values."""
    dtype = grad.dtype
    t = tf.cast(step, dtype)
    direction, new_accumulator = _graft(grad, accumulator, t, hyper)
    if plan.factors:
        graft = direction
        direction = tf.cond(
            step >= hyper.start_step,
            lambda: _preconditioned(plan, grad, graft, preconditioners, hyper),
            lambda: graft,
        )
    new_momentum = None
    if hyper.beta1 > 0:
        beta1 = tf.constant(hyper.beta1, dtype)
        new_momentum = beta1 * momentum + (1.0 - beta1) * direction
        smoothed = new_momentum
        if hyper.nesterov:
            smoothed = beta1 * new_momentum + (1.0 - beta1) * direction
        direction = smoothed / (1.0 - tf.pow(beta1, t))
    return new_accumulator, new_momentum, tf.cast(lr, dtype) * direction


def _graft(grad, accumulator, t, hyper):
    """The grafting optimizer's update and its new accumulator."""
    if hyper.grafting in ("sgd", None):
        return grad, None
    beta2 = tf.constant(hyper.beta2, grad.dtype)
    if hyper.grafting == "adagrad" or hyper.beta2 == 1.0:
        new = accumulator + tf.square(grad)
    else:
        new = beta2 * accumulator + (1.0 - beta2) * tf.square(grad)
    second_moment = new
    if hyper.grafting == "adam" and hyper.beta2 < 1.0:
        second_moment = new / (1.0 - tf.pow(beta2, t))
    epsilon = tf.constant(hyper.grafting_epsilon, grad.dtype)
    return grad / (tf.sqrt(second_moment) + epsilon), new


def _preconditioned(plan, grad, graft, preconditioners, hyper):
    grad_blocks = plan.partitioner.partition(tf.reshape(grad, plan.merged_shape))
    graft_blocks = plan.partitioner.partition(tf.reshape(graft, plan.merged_shape))
    first = plan.factors[0].index
    directions = []
    for b, block in enumerate(grad_blocks):
        factors = [None] * block.shape.rank
        for factor in plan.factors_of_block[b]:
            factors[factor.axis] = tf.cast(
                preconditioners[factor.index - first], block.dtype
            )
        direction = precondition(block, factors)
        if hyper.grafting is not None:
            direction *= tf.norm(graft_blocks[b]) / (tf.norm(direction) + 1e-16)
        directions.append(direction)
    return tf.reshape(plan.partitioner.merge(directions), grad.shape)
