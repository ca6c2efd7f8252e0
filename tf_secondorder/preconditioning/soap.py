"""SOAP's arithmetic as pure tensor functions (no Keras, no variables).

A basis holds one orthogonal matrix Q_i per preconditioned block axis. A block
is *projected* into the basis by contracting each axis i with Q_i
(G' = G ×_i Q_iᵀ; for a matrix Q_Lᵀ G Q_R) and *projected back* with Q_iᵀ.
"""

import dataclasses

import tensorflow as tf

from tf_secondorder.preconditioning.kronecker import contract_variable


@dataclasses.dataclass(frozen=True)
class Hyper:
    beta1: float
    beta2: float
    epsilon: float
    start_step: int


def project(plan, tensor, bases, back=False):
    """`tensor` (a variable's shape) rotated block by block into (or out of,
    with back=True) the basis; bases are the variable's, in plan.factors order."""
    if not plan.factors:
        return tensor
    return contract_variable(plan, tensor, bases, back=back)


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
    each step, so it survives basis changes); the second moment in the basis.
    Both start from zero at the first basis (the caller resets them), as in
    the authors' code, so their bias corrections count the steps since then:
    a first moment carried over from the Adam steps before, divided by a
    second moment one step old, would make steps of any size."""
    dtype = grad.dtype
    t = tf.cast(step, dtype)
    if plan.factors and hyper.start_step > 1:
        since_basis = t - tf.constant(hyper.start_step - 1, dtype)
        t = tf.where(since_basis >= 1, since_basis, t)
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
