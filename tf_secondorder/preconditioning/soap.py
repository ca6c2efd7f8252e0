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
from tf_secondorder.preconditioning import parts as elementwise


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


def rotate_parts(layout, stacks, bases):
    """{part: stack} of stacked parts ({part: [B, *shape]}) projected into
    the bases (`bases`: every slot's [rows, n, n])."""
    return {
        key: kronecker.contract(
            blocks,
            _group_matrices(layout, layout.parts[key].index, bases, blocks.dtype),
        )
        for key, blocks in stacks.items()
    }


def permute_axes(layout, stacks, orders):
    """{part: stack} with, per block, the entries along each factor's axis
    reordered by that factor's order (new basis column k came from old
    column order[k]); `stacks` holds stacked parts, `orders` each slot's
    [rows, n] orders."""
    out = {}
    for key, blocks in stacks.items():
        group = layout.groups[layout.parts[key].index]
        for axis, slot in zip(group.axes, group.slots):
            blocks = tf.gather(blocks, orders[slot], axis=1 + axis, batch_dims=1)
        out[key] = blocks
    return out


def eigenbasis(statistics):
    """Eigenvectors of a stack of symmetric matrices, largest eigenvalue first."""
    symmetric = 0.5 * (statistics + tf.linalg.matrix_transpose(statistics))
    _, q = tf.linalg.eigh(symmetric)
    return tf.reverse(q, axis=[-1])


def refined_basis(statistics, previous):
    """One power-iteration step with QR from the previous bases (Vyas et al.,
    Algorithm 4): columns are first sorted by their Rayleigh quotients, largest
    first, and that order is returned so the second moments can follow."""
    # S·Q once: its columns give the Rayleigh quotients, and reordered they
    # are S times the sorted basis.
    power = tf.matmul(statistics, previous)
    estimates = tf.reduce_sum(previous * power, axis=-2)
    order = tf.argsort(estimates, axis=-1, direction="DESCENDING", stable=True)
    q, _ = tf.linalg.qr(tf.gather(power, order, axis=-1, batch_dims=1))
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
    layout,
    hyper,
    grads,
    momenta,
    rotated_momenta,
    second_moments,
    bases,
    step,
    lr,
    graft_moments=None,
):
    """(new momenta, new rotated momenta, new second moments, new grafting
    second moments, deltas) for the variables in `grads` ({variable: gradient}); the caller
    subtracts each delta from its variable. The state is the layout's parts
    ({part: tensor}; `graft_moments` only for the stacked parts, or None).
    The momentum lives in the parameter's own coordinates (so it survives
    basis changes); `rotated_momenta` ({stacked part: tensor}, or None) is
    its copy in the basis, updated from the projected gradient (the caller
    projects it afresh at each new basis; None: the momentum is projected
    here), and the second moment lives in the basis, block by block. Both start from zero at the first basis (the caller
    resets them), as in the authors' code, so their bias corrections count
    the steps since then: a first moment carried over from the Adam steps
    before, divided by a second moment one step old, would make steps of
    any size. `bases` lists every slot's current bases. Variables without
    factors (the flat parts) take Adam's step.

    With `hyper.grafting`, each block's update is rescaled to the norm of
    Adam's update for that block (the same first moment over a second
    moment `graft_moments` kept in the parameter's coordinates): the basis
    chooses the direction, Adam the step length, so a learning rate tuned
    for Adam carries over. Without it, an update whitened in the
    eigenbasis is shorter than Adam's wherever the gradient is concentrated
    on a few eigenvectors, and SOAP needs a larger learning rate."""
    constants = _Constants(hyper, step, lr)
    parts, masks = elementwise.to_parts(layout, grads)
    new_momenta, new_rotated, new_second_moments, new_graft_moments = {}, {}, {}, {}
    steps = {}
    for key, grad in parts.items():
        dtype = grad.dtype
        mask = masks.get(key)
        beta1 = constants.beta1(dtype)
        momentum = beta1 * momenta[key] + (1.0 - beta1) * grad
        new_momenta[key] = elementwise.keep_missing(mask, momentum, momenta[key])
        part = layout.parts[key]
        step_size = constants.step_size(dtype, part.kind == "stack")
        grafted_step = None
        if part.kind == "flat":
            # No basis: Adam.
            v, direction = _adam(constants, grad, momentum, second_moments[key])
        else:
            matrices = _group_matrices(layout, part.index, bases, dtype)
            beta2 = constants.beta2(dtype)
            rotated = kronecker.contract(grad, matrices)
            v = beta2 * second_moments[key] + (1.0 - beta2) * tf.square(rotated)
            if rotated_momenta is None:
                rotated_momentum = kronecker.contract(momentum, matrices)
            else:
                rotated_momentum = (
                    beta1 * rotated_momenta[key] + (1.0 - beta1) * rotated
                )
                new_rotated[key] = elementwise.keep_missing(
                    mask, rotated_momentum, rotated_momenta[key]
                )
            normalized = rotated_momentum / (tf.sqrt(v) + constants.epsilon(dtype))
            direction = kronecker.contract(normalized, matrices, back=True)
            if hyper.grafting:
                graft, adam_direction = _adam(
                    constants, grad, momentum, graft_moments[key]
                )
                new_graft_moments[key] = elementwise.keep_missing(
                    mask, graft, graft_moments[key]
                )
                # ‖Q x‖ = ‖x‖ per block: the norm is taken in the basis. The
                # step size rides on the per-block scale: one multiply.
                scale = kronecker.block_norms(adam_direction) / (
                    kronecker.block_norms(normalized) + 1e-16
                )
                grafted_step = kronecker.per_block(step_size * scale, direction)
        new_second_moments[key] = elementwise.keep_missing(mask, v, second_moments[key])
        if grafted_step is None:
            steps[key] = step_size * direction
        else:
            steps[key] = grafted_step
    deltas = elementwise.from_parts(layout, steps, grads)
    return new_momenta, new_rotated, new_second_moments, new_graft_moments, deltas
