"""Shampoo's per-step arithmetic for one variable, as pure tensor functions.

Variables are read before and assigned after these calls, so they hold no
state and run the same under any tf.distribute strategy, inside
`compile(jit_compile=True)` (where XLA fuses them) or not. The caller skips
steps with non-finite gradients.
"""

import dataclasses

import tensorflow as tf

from tf_secondorder.preconditioning import kronecker


@dataclasses.dataclass(frozen=True)
class Hyper:
    beta1: float
    beta2: float
    grafting: object
    grafting_epsilon: float
    nesterov: bool
    start_step: int


def update(layout, hyper, grads, accumulators, momenta, preconditioners, step, lr):
    """{variable: (new accumulator, new momentum, delta)} for the variables in
    `grads` ({variable index: gradient}); the caller subtracts delta.
    `accumulators` / `momenta` map a variable to its state, or None when
    the grafting type or beta1 needs none (and so are the returned values);
    `preconditioners` lists every factor's current root. One `tf.cond`
    decides for all variables whether the start step has come."""
    grafts, new_accumulators = {}, {}
    for variable, grad in grads.items():
        t = tf.cast(step, grad.dtype)
        grafts[variable], new_accumulators[variable] = _graft(
            grad, accumulators[variable], t, hyper
        )
    with_factors = {v: g for v, g in grads.items() if layout.plans[v].factors}
    directions = grafts
    if with_factors:
        directions = tf.cond(
            step >= hyper.start_step,
            lambda: {
                **grafts,
                **_preconditioned(layout, hyper, with_factors, grafts, preconditioners),
            },
            lambda: dict(grafts),
        )
    out = {}
    for variable, grad in grads.items():
        dtype = grad.dtype
        t = tf.cast(step, dtype)
        direction = directions[variable]
        new_momentum = None
        if hyper.beta1 > 0:
            beta1 = tf.constant(hyper.beta1, dtype)
            new_momentum = beta1 * momenta[variable] + (1.0 - beta1) * direction
            smoothed = new_momentum
            if hyper.nesterov:
                smoothed = beta1 * new_momentum + (1.0 - beta1) * direction
            direction = smoothed / (1.0 - tf.pow(beta1, t))
        out[variable] = (
            new_accumulators[variable],
            new_momentum,
            tf.cast(lr, dtype) * direction,
        )
    return out


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


def _preconditioned(layout, hyper, grads, grafts, preconditioners):
    """D = G ×_i P_i per block, rescaled to the grafted block's norm, for the
    variables in `grads` (all with factors). Each block is its own matmuls:
    on CPU that measured faster than a BatchMatMul of stacked equal blocks
    (the stacking copies cost more than the batching saves)."""
    out = {}
    for variable, grad in grads.items():
        plan = layout.plans[variable]
        matrices = [preconditioners[f.index] for f in plan.factors]
        per_block = None
        if hyper.grafting is not None:
            grafted = plan.partitioner.partition(
                tf.reshape(grafts[variable], plan.merged_shape)
            )

            def per_block(b, direction, grafted=grafted):
                return direction * (tf.norm(grafted[b]) / (tf.norm(direction) + 1e-16))

        out[variable] = kronecker.contract_variable(
            plan, grad, matrices, per_block=per_block
        )
    return out
