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
    `preconditioners` lists every slot's current roots ([rows, n, n]). One
    `tf.cond` decides for all variables whether the start step has come.

    Scalars that depend only on the step (bias corrections, the step size)
    are computed once per dtype."""
    scalars = {}
    grafts, new_accumulators = {}, {}
    for variable, grad in grads.items():
        constants = _step_scalars(scalars, grad.dtype, hyper, step, lr)
        grafts[variable], new_accumulators[variable] = _graft(
            grad, accumulators[variable], constants, hyper
        )
    directions = dict(grafts)
    with_factors = {v: g for v, g in grads.items() if layout.plans[v].factors}
    if with_factors:
        directions.update(
            tf.cond(
                step >= hyper.start_step,
                lambda: _preconditioned(
                    layout, hyper, with_factors, grafts, preconditioners
                ),
                lambda: {v: grafts[v] for v in with_factors},
            )
        )
    out = {}
    for variable, grad in grads.items():
        constants = scalars[grad.dtype]
        direction = directions[variable]
        new_momentum = None
        if hyper.beta1 > 0:
            beta1 = constants["beta1"]
            weight = constants["1-beta1"]
            new_momentum = beta1 * momenta[variable] + weight * direction
            if hyper.nesterov:
                direction = beta1 * new_momentum + weight * direction
            else:
                direction = new_momentum
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


def _preconditioned(layout, hyper, grads, grafts, preconditioners):
    """{variable: D}, D = G ×_i P_i block by block, for the variables in
    `grads` (all with factors), with each block's D scaled to the norm of
    the grafting update's block. Blocks of one shape from every variable
    are one stack: a batched matmul per axis and group."""
    shapes = {v: g.shape for v, g in grads.items()}
    dtypes = {v: g.dtype for v, g in grads.items()}
    stacks, _ = kronecker.to_stacks(layout, grads)
    grafted = (
        kronecker.to_stacks(layout, grafts)[0] if hyper.grafting is not None else {}
    )
    directions = {}
    for number, blocks in stacks.items():
        group = layout.groups[number]
        matrices = [None] * len(group.shape)
        for axis, slot in zip(group.axes, group.slots):
            matrices[axis] = tf.cast(preconditioners[slot], blocks.dtype)
        direction = kronecker.contract(blocks, matrices)
        if hyper.grafting is not None:
            target = kronecker.block_norms(grafted[number])
            scale = target / (kronecker.block_norms(direction) + 1e-16)
            direction = kronecker.per_block(scale, direction)
        directions[number] = direction
    out = kronecker.from_stacks(layout, directions, list(grads), shapes)
    return {v: tf.cast(d, dtypes[v]) for v, d in out.items()}
