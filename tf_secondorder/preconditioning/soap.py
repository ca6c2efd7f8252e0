"""SOAP's arithmetic as pure tensor functions (no Keras, no variables).

A basis holds one orthogonal matrix Q_i per preconditioned block axis,
stacked per layout slot ([rows, n, n]). A block is *projected* into the
basis by contracting each axis i with Q_i (G' = G ×_i Q_iᵀ; for a matrix
Q_Lᵀ G Q_R) and *projected back* with Q_iᵀ; blocks of one shape from every
variable are projected together, as one stack.
"""

import dataclasses

import tensorflow as tf

from tf_secondorder.preconditioning import kronecker


@dataclasses.dataclass(frozen=True)
class Hyper:
    beta1: float
    beta2: float
    epsilon: float
    start_step: int
    grafting: bool = False


def _group_matrices(layout, number, bases, dtype):
    group = layout.groups[number]
    matrices = [None] * len(group.shape)
    for axis, slot in zip(group.axes, group.slots):
        matrices[axis] = tf.cast(bases[slot], dtype)
    return matrices


def permute_axes(layout, tensors, orders):
    """{variable: tensor} with, per block, the entries along each factor's
    axis reordered by that factor's order (new basis column k came from old
    column order[k]); `orders` holds each slot's [rows, n] orders."""
    stacks, _ = kronecker.to_stacks(layout, tensors)
    for number, blocks in stacks.items():
        group = layout.groups[number]
        for axis, slot in zip(group.axes, group.slots):
            blocks = tf.gather(blocks, orders[slot], axis=1 + axis, batch_dims=1)
        stacks[number] = blocks
    shapes = {v: t.shape for v, t in tensors.items()}
    return kronecker.from_stacks(layout, stacks, list(tensors), shapes)


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


class _Constants:
    """The step's scalars, made once per dtype (and per kind of variable)
    rather than once per variable: the traced graph, and so the first
    step, stays small."""

    def __init__(self, hyper, step, lr):
        self.hyper, self.step, self.lr = hyper, step, lr
        self._made = {}

    def _once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def beta1(self, dtype):
        return self._once(
            ("beta1", dtype), lambda: tf.constant(self.hyper.beta1, dtype)
        )

    def beta2(self, dtype):
        return self._once(
            ("beta2", dtype), lambda: tf.constant(self.hyper.beta2, dtype)
        )

    def epsilon(self, dtype):
        return self._once(
            ("epsilon", dtype), lambda: tf.constant(self.hyper.epsilon, dtype)
        )

    def step_size(self, dtype, rotated):
        """lr · √(1 − β2^t) / (1 − β1^t), with t counted from the first basis
        for variables with one (`rotated`)."""

        def make():
            hyper = self.hyper
            t = tf.cast(self.step, dtype)
            if rotated and hyper.start_step > 1:
                since_basis = t - tf.constant(hyper.start_step - 1, dtype)
                t = tf.where(since_basis >= 1, since_basis, t)
            size = tf.cast(self.lr, dtype) * tf.sqrt(1.0 - tf.pow(self.beta2(dtype), t))
            return size / (1.0 - tf.pow(self.beta1(dtype), t))

        return self._once(("step_size", dtype, rotated), make)


def _adam(constants, grad, momentum, second_moment):
    """Adam's new second moment and direction m / (√v + ε), in the
    parameter's coordinates (bias corrections are the caller's)."""
    beta2 = constants.beta2(grad.dtype)
    v = beta2 * second_moment + (1.0 - beta2) * tf.square(grad)
    return v, momentum / (tf.sqrt(v) + constants.epsilon(grad.dtype))


def update(
    layout, hyper, grads, momenta, second_moments, bases, step, lr, graft_moments=None
):
    """{variable: (new momentum, new rotated second moment, new grafting
    second moment or None, delta)} for the variables in `grads` ({variable:
    gradient}); the caller subtracts delta.
    The momentum lives in the parameter's own coordinates (projected each
    step, so it survives basis changes); the second moment in the basis,
    stored in the parameter's shape block by block. Both start from zero at
    the first basis (the caller resets them), as in the authors' code, so
    their bias corrections count the steps since then: a first moment
    carried over from the Adam steps before, divided by a second moment one
    step old, would make steps of any size. `bases` lists every slot's
    current bases.

    With `hyper.grafting`, each block's update is rescaled to the norm of
    Adam's update for that block (the same first moment over a second
    moment `graft_moments` kept in the parameter's coordinates): the basis
    chooses the direction, Adam the step length, so a learning rate tuned
    for Adam carries over. Without it, an update whitened in the
    eigenbasis is shorter than Adam's wherever the gradient is concentrated
    on a few eigenvectors, and SOAP needs a larger learning rate."""
    constants = _Constants(hyper, step, lr)
    new_momenta, new_second_moments, directions = {}, {}, {}
    new_graft_moments = {}
    for variable, grad in grads.items():
        beta1 = constants.beta1(grad.dtype)
        new_momenta[variable] = beta1 * momenta[variable] + (1.0 - beta1) * grad
    with_factors = [v for v in grads if layout.plans[v].factors]
    for variable in grads:
        if variable in with_factors:
            continue
        # No basis: Adam.
        new_second_moments[variable], directions[variable] = _adam(
            constants,
            grads[variable],
            new_momenta[variable],
            second_moments[variable],
        )
    if with_factors:
        shapes = {v: grads[v].shape for v in with_factors}

        def stacks(tensors):
            return kronecker.to_stacks(layout, {v: tensors[v] for v in with_factors})[0]

        grad_stacks = stacks(grads)
        momentum_stacks = stacks(new_momenta)
        second_moment_stacks = stacks(second_moments)
        graft_stacks = {}
        if hyper.grafting:
            adam_directions = {}
            for variable in with_factors:
                new_graft_moments[variable], adam_directions[variable] = _adam(
                    constants,
                    grads[variable],
                    new_momenta[variable],
                    graft_moments[variable],
                )
            graft_stacks = stacks(adam_directions)
        v_stacks, direction_stacks = {}, {}
        for number, blocks in grad_stacks.items():
            dtype = blocks.dtype
            matrices = _group_matrices(layout, number, bases, dtype)
            beta2 = constants.beta2(dtype)
            rotated = kronecker.contract(blocks, matrices)
            v = beta2 * second_moment_stacks[number] + (1.0 - beta2) * tf.square(
                rotated
            )
            v_stacks[number] = v
            normalized = kronecker.contract(momentum_stacks[number], matrices) / (
                tf.sqrt(v) + constants.epsilon(dtype)
            )
            direction = kronecker.contract(normalized, matrices, back=True)
            if hyper.grafting:
                # ‖Q x‖ = ‖x‖ per block: the norm is taken in the basis.
                scale = kronecker.block_norms(graft_stacks[number]) / (
                    kronecker.block_norms(normalized) + 1e-16
                )
                direction = kronecker.per_block(scale, direction)
            direction_stacks[number] = direction
        new_second_moments.update(
            kronecker.from_stacks(layout, v_stacks, with_factors, shapes)
        )
        directions.update(
            kronecker.from_stacks(layout, direction_stacks, with_factors, shapes)
        )
    out = {}
    for variable, grad in grads.items():
        rotated = bool(layout.plans[variable].factors)
        step_size = constants.step_size(grad.dtype, rotated)
        direction = directions[variable]
        out[variable] = (
            new_momenta[variable],
            new_second_moments[variable],
            new_graft_moments.get(variable),
            step_size * direction,
        )
    return out
