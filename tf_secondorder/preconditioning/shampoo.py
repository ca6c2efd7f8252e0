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
    # What each part adds to its momentum, (1 − β1)·D: one multiply per
    # element carries the momentum's weight with the grafting step's bias
    # correction, or with the per-block rescaling of a preconditioned D.
    stacked = {k: g for k, g in parts.items() if layout.parts[k].kind == "stack"}
    contributions = {
        key: _grafted(scalars, graft)
        for key, graft in grafts.items()
        if key not in stacked
    }
    if stacked:
        contributions.update(
            tf.cond(
                step >= hyper.start_step,
                lambda: _preconditioned(
                    layout, hyper, scalars, stacked, grafts, preconditioners
                ),
                lambda: {k: _grafted(scalars, grafts[k]) for k in stacked},
            )
        )
    new_momenta, steps = {}, {}
    for key, contribution in contributions.items():
        constants = scalars[contribution.dtype]
        direction = contribution
        if hyper.beta1 > 0:
            old = momenta[key]
            new = constants["beta1"] * old + contribution
            new_momenta[key] = elementwise.keep_missing(masks.get(key), new, old)
            direction = new
            if hyper.nesterov:
                direction = constants["beta1"] * new + contribution
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
        # Adam's update g / (√(v / c) + ε) equals √c · g / (√v + ε·√c), with
        # c = 1 − β2^t: `_graft` returns the fraction, and √c (`graft_factor`)
        # multiplies a scalar later instead of every element of v.
        factor = tf.constant(1.0, dtype)
        if hyper.grafting in ("rmsprop", "adam", "adagrad"):
            beta2 = tf.constant(hyper.beta2, dtype)
            constants["beta2"] = beta2
            constants["1-beta2"] = 1.0 - beta2
            epsilon = tf.constant(hyper.grafting_epsilon, dtype)
            if hyper.grafting == "adam" and hyper.beta2 < 1.0:
                factor = tf.sqrt(1.0 - tf.pow(beta2, t))
                epsilon = epsilon * factor
            constants["grafting_epsilon"] = epsilon
        constants["graft_factor"] = factor
        constants["graft_weight"] = constants["1-beta1"] * factor
        scalars[dtype] = constants
    return scalars[dtype]


def _graft(grad, accumulator, constants, hyper):
    """The grafting optimizer's update divided by `graft_factor`, and its
    new accumulator."""
    if hyper.grafting in ("sgd", None):
        return grad, None
    beta2 = constants["beta2"]
    if hyper.grafting == "adagrad" or hyper.beta2 == 1.0:
        new = accumulator + tf.square(grad)
    else:
        new = beta2 * accumulator + constants["1-beta2"] * tf.square(grad)
    return grad / (tf.sqrt(new) + constants["grafting_epsilon"]), new


def _grafted(scalars, graft):
    """(1 − β1) times the grafting optimizer's update."""
    return scalars[graft.dtype]["graft_weight"] * graft


def _preconditioned(layout, hyper, scalars, stacks, grafts, preconditioners):
    """{part: (1 − β1)·D}, D = G ×_i P_i for every block of the stacks in
    `stacks` ({part: [B, *shape]}), each block's D scaled to the norm of
    the grafting update's block (`grafts`, the same parts): a batched matmul
    per axis and group."""
    contributions = {}
    for key, blocks in stacks.items():
        constants = scalars[blocks.dtype]
        group = layout.groups[layout.parts[key].index]
        matrices = [None] * len(group.shape)
        for axis, slot in zip(group.axes, group.slots):
            matrices[axis] = tf.cast(preconditioners[slot], blocks.dtype)
        direction = kronecker.contract(blocks, matrices)
        if hyper.grafting is None:
            contributions[key] = constants["1-beta1"] * direction
            continue
        target = constants["graft_factor"] * kronecker.block_norms(grafts[key])
        scale = target / (kronecker.block_norms(direction) + 1e-16)
        contributions[key] = kronecker.per_block(
            constants["1-beta1"] * scale, direction
        )
    return contributions
