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
    decides for all variables whether the start step has come.

    Scalars that depend only on the step (bias corrections, the step size)
    are computed once per dtype, and a one-block variable's grafting scale
    is applied to the scalar (1 − β1) rather than to its whole direction:
    fewer ops to trace and fewer passes over every parameter."""
    scalars = {}
    grafts, new_accumulators = {}, {}
    for variable, grad in grads.items():
        constants = _step_scalars(scalars, grad.dtype, hyper, step, lr)
        grafts[variable], new_accumulators[variable] = _graft(
            grad, accumulators[variable], constants, hyper
        )
    directions = {v: (g, None) for v, g in grafts.items()}
    with_factors = {v: g for v, g in grads.items() if layout.plans[v].factors}
    if with_factors:
        directions.update(
            tf.cond(
                step >= hyper.start_step,
                lambda: _preconditioned(
                    layout, hyper, with_factors, grafts, preconditioners
                ),
                lambda: {
                    v: (grafts[v], tf.ones([], g.dtype))
                    for v, g in with_factors.items()
                },
            )
        )
    out = {}
    for variable, grad in grads.items():
        constants = scalars[grad.dtype]
        direction, scale = directions[variable]
        new_momentum = None
        if hyper.beta1 > 0:
            beta1 = constants["beta1"]
            weight = constants["1-beta1"]
            if scale is not None:
                weight = weight * scale
            new_momentum = beta1 * momenta[variable] + weight * direction
            direction = new_momentum
            if hyper.nesterov:
                direction = beta1 * new_momentum + weight * directions[variable][0]
        elif scale is not None:
            direction = direction * scale
        out[variable] = (
            new_accumulators[variable],
            new_momentum,
            constants["step_size"] * direction,
        )
    return out


def _step_scalars(scalars, dtype, hyper, step, lr):
    """The step's scalars in `dtype`, made once per dtype."""
    if dtype not in scalars:
        t = tf.cast(step, dtype)
        beta1 = tf.constant(hyper.beta1, dtype)
        constants = {"beta1": beta1, "1-beta1": 1.0 - beta1}
        step_size = tf.cast(lr, dtype)
        if hyper.beta1 > 0:
            step_size = step_size / (1.0 - tf.pow(beta1, t))
        constants["step_size"] = step_size
        if hyper.grafting in ("rmsprop", "adam", "adagrad"):
            beta2 = tf.constant(hyper.beta2, dtype)
            constants["beta2"] = beta2
            constants["1-beta2"] = 1.0 - beta2
            constants["second_moment_correction"] = None
            if hyper.grafting == "adam" and hyper.beta2 < 1.0:
                constants["second_moment_correction"] = 1.0 - tf.pow(beta2, t)
            constants["grafting_epsilon"] = tf.constant(hyper.grafting_epsilon, dtype)
        scalars[dtype] = constants
    return scalars[dtype]


def _graft(grad, accumulator, constants, hyper):
    """The grafting optimizer's update and its new accumulator."""
    if hyper.grafting in ("sgd", None):
        return grad, None
    beta2 = constants["beta2"]
    if hyper.grafting == "adagrad" or hyper.beta2 == 1.0:
        new = accumulator + tf.square(grad)
    else:
        new = beta2 * accumulator + constants["1-beta2"] * tf.square(grad)
    second_moment = new
    if constants["second_moment_correction"] is not None:
        second_moment = new / constants["second_moment_correction"]
    return grad / (tf.sqrt(second_moment) + constants["grafting_epsilon"]), new


def _norm(x):
    # One pass (L2Loss is Σx²/2) where tf.norm makes two (square, sum).
    return tf.sqrt(2.0 * tf.nn.l2_loss(x))


def _preconditioned(layout, hyper, grads, grafts, preconditioners):
    """{variable: (D, scale)}: D = G ×_i P_i per block, for the variables in
    `grads` (all with factors). With grafting, a one-block variable's D comes
    unscaled with its scale ‖U‖/‖D‖ (applied by the caller to a scalar); a
    many-block one's D comes rescaled block by block, with scale 1. Each
    block is its own matmuls: on CPU that measured faster than a BatchMatMul
    of stacked equal blocks (the stacking copies cost more than the batching
    saves)."""
    out = {}
    for variable, grad in grads.items():
        plan = layout.plans[variable]
        matrices = [preconditioners[f.index] for f in plan.factors]
        one = tf.ones([], grad.dtype)
        if hyper.grafting is None:
            out[variable] = (kronecker.contract_variable(plan, grad, matrices), one)
            continue
        grafted = plan.partitioner.partition(
            tf.reshape(grafts[variable], plan.merged_shape)
        )
        scales = []

        def per_block(b, direction, grafted=grafted, scales=scales):
            scales.append(_norm(grafted[b]) / (_norm(direction) + 1e-16))
            return direction if len(grafted) == 1 else direction * scales[-1]

        direction = kronecker.contract_variable(
            plan, grad, matrices, per_block=per_block
        )
        out[variable] = (direction, scales[0] if len(grafted) == 1 else one)
    return out
