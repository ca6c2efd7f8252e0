"""SOAP's arithmetic as pure tensor functions (no Keras, no variables).

A basis holds one orthogonal matrix Q_i per preconditioned block axis. A block
is *projected* into the basis by contracting each axis i with Q_i
(G' = G ×_i Q_iᵀ; for a matrix Q_Lᵀ G Q_R) and *projected back* with Q_iᵀ.
"""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Hyper:
    beta1: float
    beta2: float
    epsilon: float


def rotate_block(block, bases, back=False):
    """Contracts axis i of `block` with bases[i] (None: left alone)."""
    rank = block.shape.rank
    if rank == 2:
        left, right = bases
        if left is not None:
            block = tf.matmul(left, block, transpose_a=not back)
        if right is not None:
            block = tf.matmul(block, right, transpose_b=back)
        return block
    # Contracting axis 0 appends the new axis last, so after `rank` steps the
    # axes are back in order.
    for basis in bases:
        if basis is None:
            block = tf.transpose(block, list(range(1, rank)) + [0])
        else:
            block = tf.tensordot(block, basis, axes=[[0], [1 if back else 0]])
    return block


def project(plan, tensor, bases, back=False):
    """`tensor` (a variable's shape) rotated block by block into (or out of,
    with back=True) the basis; bases are the variable's in plan.factors order."""
    if not plan.factors:
        return tensor
    first = plan.factors[0].index
    blocks = plan.partitioner.partition(tf.reshape(tensor, plan.merged_shape))
    rotated = []
    for b, block in enumerate(blocks):
        per_axis = [None] * block.shape.rank
        for factor in plan.factors_of_block[b]:
            per_axis[factor.axis] = tf.cast(bases[factor.index - first], block.dtype)
        rotated.append(rotate_block(block, per_axis, back))
    return tf.reshape(plan.partitioner.merge(rotated), tensor.shape)


def permute_axes(plan, tensor, orders):
    """Reorders, per block, the entries along each factor's axis by orders[k]
    (the new basis column k came from old column orders[k])."""
    if not plan.factors:
        return tensor
    first = plan.factors[0].index
    blocks = plan.partitioner.partition(tf.reshape(tensor, plan.merged_shape))
    for factor in plan.factors:
        order = orders[factor.index - first]
        blocks[factor.block] = tf.gather(blocks[factor.block], order, axis=factor.axis)
    return tf.reshape(plan.partitioner.merge(blocks), tensor.shape)


def eigenbasis(statistics):
    """Eigenvectors of a stack of symmetric matrices, largest eigenvalue first."""
    symmetric = 0.5 * (statistics + tf.linalg.matrix_transpose(statistics))
    _, q = tf.linalg.eigh(symmetric)
    return tf.reverse(q, axis=[-1])


def refined_basis(statistics, previous):
    """One power-iteration step with QR from the previous bases (Vyas et al.,
    Algorithm 4): columns are first sorted by their Rayleigh quotients, largest
    first, and that order is returned so the second moments can follow."""
    estimates = tf.reduce_sum(previous * tf.matmul(statistics, previous), axis=-2)
    order = tf.argsort(estimates, axis=-1, direction="DESCENDING", stable=True)
    sorted_previous = tf.gather(previous, order, axis=-1, batch_dims=1)
    q, _ = tf.linalg.qr(tf.matmul(statistics, sorted_previous))
    return q, order


def update(plan, hyper, grad, momentum, second_moment, bases, step, lr):
    """(new momentum, new rotated second moment, delta); the caller subtracts
    delta. The momentum lives in the parameter's own coordinates (projected
    each step, so it survives basis changes); the second moment in the basis."""
    dtype = grad.dtype
    t = tf.cast(step, dtype)
    beta1 = tf.constant(hyper.beta1, dtype)
    beta2 = tf.constant(hyper.beta2, dtype)
    new_momentum = beta1 * momentum + (1.0 - beta1) * grad
    rotated = project(plan, grad, bases)
    new_second_moment = beta2 * second_moment + (1.0 - beta2) * tf.square(rotated)
    normalized = project(plan, new_momentum, bases) / (
        tf.sqrt(new_second_moment) + tf.constant(hyper.epsilon, dtype)
    )
    direction = project(plan, normalized, bases, back=True)
    step_size = tf.cast(lr, dtype) * tf.sqrt(1.0 - tf.pow(beta2, t))
    step_size /= 1.0 - tf.pow(beta1, t)
    return new_momentum, new_second_moment, step_size * direction
