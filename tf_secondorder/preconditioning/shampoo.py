"""Shampoo's per-step arithmetic for one variable, as pure tensor functions.

Variables are read before and assigned after these calls, so they hold no
state and run the same under any tf.distribute strategy, inside
`compile(jit_compile=True)` (where XLA fuses them) or not. The caller skips
steps with non-finite gradients.
"""

import dataclasses

import tensorflow as tf

from tf_secondorder.preconditioning.kronecker import contract_variable


@dataclasses.dataclass(frozen=True)
class Hyper:
    beta1: float
    beta2: float
    grafting: object
    grafting_epsilon: float
    nesterov: bool
    start_step: int


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
    """D = G ×_i P_i per block, rescaled to the grafted block's norm."""
    if hyper.grafting is None:
        return contract_variable(plan, grad, preconditioners)
    graft_blocks = plan.partitioner.partition(tf.reshape(graft, plan.merged_shape))

    def graft_norm(b, direction, _):
        return direction * (tf.norm(graft_blocks[b]) / (tf.norm(direction) + 1e-16))

    return contract_variable(plan, grad, preconditioners, per_block=graft_norm)
