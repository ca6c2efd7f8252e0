"""Shampoo's per-step arithmetic, as pure tensor functions.

Variables are read before and assigned after these calls, so they hold no
state and run the same under any tf.distribute strategy, inside
`compile(jit_compile=True)` (where XLA fuses them) or not. The caller skips
steps with non-finite gradients.
"""

import dataclasses

import tensorflow as tf

from tf_secondorder.preconditioning import kronecker
from tf_secondorder.preconditioning import parts as elementwise


@dataclasses.dataclass(frozen=True)
class Hyper:
    beta1: float
    beta2: float
    grafting: object
    grafting_epsilon: float
    nesterov: bool
    start_step: int


def update(layout, hyper, grads, accumulators, momenta, preconditioners, step, lr):
    """(new accumulators, new momenta, deltas) for the variables in `grads`
    ({variable index: gradient}); the caller subtracts each delta from its
    variable. The grafting accumulators and momenta are the layout's parts
    ({part: tensor}; None when the grafting type or beta1 needs none, and
    so are the returned ones); `preconditioners` lists every slot's current
    roots ([rows, n, n]). Grafting and momentum run once per part; one
    `tf.cond` decides for all of them whether the start step has come.

    Scalars that depend only on the step (bias corrections, the step size)
    are computed once per dtype."""
    parts, masks = elementwise.to_parts(layout, grads)
    scalars = {}
    grafts, new_accumulators = {}, {}
    for key, grad in parts.items():
        constants = _step_scalars(scalars, grad.dtype, hyper, step, lr)
        old = None if accumulators is None else accumulators[key]
        grafts[key], new = _graft(grad, old, constants, hyper)
        if new is not None:
            new_accumulators[key] = elementwise.keep_missing(masks.get(key), new, old)
    directions = dict(grafts)
    stacked = {k: g for k, g in parts.items() if layout.parts[k].kind == "stack"}
    if stacked:
        directions.update(
            tf.cond(
                step >= hyper.start_step,
                lambda: _preconditioned(
                    layout, hyper, stacked, grafts, preconditioners
                ),
                lambda: {k: grafts[k] for k in stacked},
            )
        )
    new_momenta, steps = {}, {}
    for key, direction in directions.items():
        constants = scalars[direction.dtype]
        if hyper.beta1 > 0:
            beta1 = constants["beta1"]
            weight = constants["1-beta1"]
            old = momenta[key]
            new = beta1 * old + weight * direction
            new_momenta[key] = elementwise.keep_missing(masks.get(key), new, old)
            if hyper.nesterov:
                direction = beta1 * new + weight * direction
            else:
                direction = new
        steps[key] = constants["step_size"] * direction
    deltas = elementwise.from_parts(layout, steps, grads)
    if accumulators is None:
        new_accumulators = None
    if momenta is None:
        new_momenta = None
    return new_accumulators, new_momenta, deltas


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


def _preconditioned(layout, hyper, stacks, grafts, preconditioners):
    """{part: D}, D = G ×_i P_i for every block of the stacks in `stacks`
    ({part: [B, *shape]}), each block's D scaled to the norm of the
    grafting update's block (`grafts`, the same parts): a batched matmul
    per axis and group."""
    directions = {}
    for key, blocks in stacks.items():
        group = layout.groups[layout.parts[key].index]
        matrices = [None] * len(group.shape)
        for axis, slot in zip(group.axes, group.slots):
            matrices[axis] = tf.cast(preconditioners[slot], blocks.dtype)
        direction = kronecker.contract(blocks, matrices)
        if hyper.grafting is not None:
            target = kronecker.block_norms(grafts[key])
            scale = target / (kronecker.block_norms(direction) + 1e-16)
            direction = kronecker.per_block(scale, direction)
        directions[key] = direction
    return directions
