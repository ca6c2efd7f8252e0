"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner."""

import keras
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.optimizers.preconditioned import PreconditionedOptimizer
from tf_secondorder.optimizers.tensors import (
    concat_rows,
    dense,
    read,
    split_rows,
    stacked_identity,
)
from tf_secondorder.preconditioning import soap as kernels


@keras.saving.register_keras_serializable(package="tf_secondorder")
class SOAP(PreconditionedOptimizer):
    """ShampoO with Adam in the Preconditioner's eigenbasis (Vyas et al. 2024).

    Parameters are merged and blocked exactly as in `tfso.Shampoo`. For a block
    G of order k each preconditioned dimension i keeps Shampoo's statistic

        S_i ← β_s·S_i + (1 − β_s)·G_(i) G_(i)ᵀ        (β_s = `shampoo_beta`)

    and an orthogonal basis Q_i (the identity before the first refresh). At
    steps `start`, `start + N`, ... (N = `precondition_frequency`) the bases
    are refreshed: the first time Q_i = eigenvectors of S_i (largest
    eigenvalue first); afterwards one power-iteration step from the previous
    basis, Q_i = QR(S_i · Q_i) with Q_i's columns first sorted by their
    Rayleigh quotients (the second moments are permuted the same way). Then
    with G' = G ×_1 Q_1ᵀ ... ×_k Q_kᵀ (Q_Lᵀ G Q_R for a matrix):

        m ← β1·m + (1 − β1)·G                 (in the parameter's coordinates)
        v ← β2·v + (1 − β2)·G'²               (in the basis)
        U = (M' / (√v + ε)) ×_1 Q_1 ... ×_k Q_k,   M' = m rotated like G'
        U ← U · ‖A‖ / ‖U‖   per block, A = m / (√a + ε),
                            a ← β2·a + (1 − β2)·G²      (grafting="adam")
        θ ← θ − lr·√(1 − β2^t)/(1 − β1^t) · U

    Before the first refresh (and for parameters with no preconditioned
    dimension) this is Adam. At the first basis m and v start afresh from
    zero (as in the authors' code) and t counts the steps since then. m is
    kept in the parameter's coordinates, as in the authors' code, so that it
    survives basis changes exactly; its copy M' in the basis is updated from
    G' between refreshes (which equals m rotated, without projecting m at
    every step) and projected afresh from m at each new basis. Under local
    SGD, where m is averaged between refreshes, M' is m projected at every
    step. A refresh whose matrices are non-finite is rejected (the old basis
    kept, `root_failures` incremented); a step with a NaN/Inf gradient is
    skipped and counted in `nonfinite_steps`. Under MirroredStrategy /
    MultiWorkerMirroredStrategy the refresh is split across replicas like
    Shampoo's roots (`distribute_roots`).

    Args:
        learning_rate: float, schedule or callable. Defaults to `0.003`.
        beta1: decay of the first moment, in `[0, 1)`. Defaults to `0.95`.
        beta2: decay of the second moment, in `[0, 1)`. Defaults to `0.95`.
        shampoo_beta: decay of the statistics, in `(0, 1]`; `None` means
            `beta2`.
        epsilon: added to √v. Defaults to `1e-8`.
        block_size: longest block side. Defaults to `256` (as Shampoo).
        precondition_frequency: steps between basis refreshes. Defaults to 10.
        start_preconditioning_step: the (1-based) step whose statistics,
            that step's gradient included, give the first basis. Defaults
            to `1`.
        statistics_frequency: after the first refresh, update the statistics
            only on steps t with t % statistics_frequency == 0 (before it,
            every step). Defaults to `1`.
        max_preconditioned_dim: dimensions longer than this (after merging)
            keep the identity basis. `None`: no limit.
        statistics_dtype: `None`/`"float32"` or `"bfloat16"` (stochastic
            rounding), as in Shampoo.
        distribute_roots: `"auto"`, `True` or `False`, as in Shampoo.
        packed_statistics: store each statistic as its upper triangle, as
            in Shampoo. Defaults to `False`.
        grafting: `"adam"` or `None`. `"adam"` (the default) gives each
            block's update the length of Adam's update for that block (same
            first moment, a second moment `a` kept in the parameter's
            coordinates: one more parameter-sized slot), so the basis sets
            the direction and Adam the step length, as grafting does for
            Shampoo. An update whitened in the eigenbasis is shorter than
            Adam's wherever the gradient lies on a few eigenvectors (every
            rotated coordinate moves by about lr, and few carry the
            gradient), so without grafting SOAP needs a several times larger
            learning rate than Adam, and a user who swaps Adam(1e-3) for
            SOAP(1e-3) trains far slower. `None` is the authors' update.
        precondition_1d: whether vectors (biases, normalization scales) get
            a basis. Defaults to `False`, as in the authors' code: they get
            Adam's update.
        root_refresh, refresh_delay: as in Shampoo, for the bases:
            pipelined by default (computed on the host from a snapshot of
            step t's statistics, installed at step t + d); until the first
            bases arrive the update is Adam's. With `"in_step"` (and under
            local SGD) the bases of step t's statistics are computed after
            that step's update and first used at step t + 1 (as with a
            delay of 1): a basis is never applied to the gradient that
            completed its statistics. In that gradient's own basis the
            gradient is diagonal up to rounding, and Adam's normalisation
            there turns the rounding noise into full-size steps; the
            authors' code skips the first step's update for this reason.
        compression, error_feedback, aggregation, average_every,
        average_warmup_steps, saddle_escape: what replicas send each other
            (`tfso.distribute.CommunicationConfig`). Under local SGD each
            replica keeps its own basis and the second moment in it (an
            average of two bases is no basis); weights, the first moment and
            the statistics are averaged, and the next refresh starts from
            the averaged statistics.
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as for every
            `keras.optimizers.Optimizer`.

    References:
        - Vyas, Morwani, Zhao, Shapira, Brandfonbrener, Janson, Kakade (2024).
          SOAP: Improving and Stabilizing Shampoo using Adam. arXiv:2409.11321.
        - Gupta, Koren, Singer (2018). Shampoo. arXiv:1802.09568.
        - Agarwal, Anil, Hazan, Koren, Zhang (2020). Disentangling Adaptive
          Gradient Methods from Learning Rates. arXiv:2002.11803 (grafting).
    """

    # A basis refreshed in the step serves from the next step on.
    refresh_after_update = True

    def __init__(
        self,
        learning_rate=0.003,
        beta1=0.95,
        beta2=0.95,
        shampoo_beta=None,
        epsilon=1e-8,
        block_size=256,
        precondition_frequency=10,
        start_preconditioning_step=1,
        statistics_frequency=1,
        max_preconditioned_dim=None,
        statistics_dtype=None,
        distribute_roots="auto",
        precondition_1d=False,
        packed_statistics=False,
        root_refresh="auto",
        refresh_delay=None,
        grafting="adam",
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="soap",
        **kwargs,
    ):
        validation.learning_rate(learning_rate)
        options = {
            "beta1": validation.number("beta1", beta1, 0.0, 1.0, high_open=True),
            "beta2": validation.number("beta2", beta2, 0.0, 1.0, high_open=True),
            "shampoo_beta": validation.number(
                "shampoo_beta", shampoo_beta, 0.0, 1.0, low_open=True, optional=True
            ),
            # ε = 0 would divide 0 by 0 on coordinates no gradient reached.
            "epsilon": validation.number("epsilon", epsilon, 0.0, low_open=True),
            "grafting": validation.choice("grafting", grafting, ("adam", None)),
        }
        super().__init__(
            learning_rate=learning_rate,
            block_size=block_size,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=validation.integer(
                "start_preconditioning_step", start_preconditioning_step, 1
            ),
            statistics_frequency=statistics_frequency,
            max_preconditioned_dim=max_preconditioned_dim,
            statistics_dtype=statistics_dtype,
            distribute_roots=distribute_roots,
            precondition_1d=precondition_1d,
            packed_statistics=packed_statistics,
            root_refresh=root_refresh,
            refresh_delay=refresh_delay,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        for key, value in options.items():
            setattr(self, key, value)

    @property
    def start_step(self):
        return self.start_preconditioning_step

    @property
    def statistics_beta(self):
        return self.beta2 if self.shampoo_beta is None else self.shampoo_beta

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._bases = [
            self.add_variable(
                (slot.count, slot.size, slot.size),
                initializer=stacked_identity,
                dtype=slot.dtype,
                name=self.slot_variable_name(slot, "basis"),
            )
            for slot in self._layout.slots
        ]
        # Moments per part of the layout (a group's stacked blocks, the
        # second moment in the basis; or the flat vector of the variables
        # without factors): one variable and one update per part.
        self._momentums = self.add_part_variables("momentum")
        # The first moment again, in the basis: updated from the projected
        # gradient that the second moment needs anyway, it saves projecting
        # the moment at every step; it is re-projected from the moment above
        # at each new basis. Not under local SGD, where the moment above is
        # averaged between refreshes and its projection is taken each step.
        self._rotated_momentums = []
        if not self.communication.local_sgd:
            self._rotated_momentums = self.add_part_variables(
                "rotated_momentum", kind="stack"
            )
        self._second_moments = self.add_part_variables("rotated_second_moment")
        # Adam's second moment in the parameter's coordinates, for the
        # grafted step length; only the stacked parts (with a basis) need it.
        self._graft_moments = []
        if self.grafting is not None:
            self._graft_moments = self.add_part_variables(
                "grafting_second_moment", kind="stack"
            )
        self._hyper = kernels.Hyper(
            self.beta1,
            self.beta2,
            self.epsilon,
            self.first_preconditioned_step,
            grafting=self.grafting is not None,
        )

    def replica_specific_variables(self):
        # Under local SGD each replica's basis comes from its own statistics;
        # the second moment is in that basis. Averages would mix bases.
        return self._bases + self._second_moments

    # -- the refresh and the step -----------------------------------------

    def refresh_specs(self, slot, rows):
        # The basis, and the order its columns came in from the old one.
        spec = self._layout.slots[slot]
        return (
            ((rows, spec.size, spec.size), spec.dtype),
            ((rows, spec.size), "int32"),
        )

    def current_refreshed(self, slot):
        return (read(self._bases[slot]),)

    def unchanged_refreshed(self, slot, begin, end):
        # The current basis, its columns in their order.
        (basis,) = self.current_refreshed(slot)
        order = tf.range(self._layout.slots[slot].size)[None, :]
        return basis[begin:end], tf.tile(order, [end - begin, 1])

    def refresh(self, items, statistic, current, refresh_step):
        """New bases of rows of slots: one batched eigh (or power step and
        QR) per matrix size over every item of that size."""
        first = tf.equal(refresh_step, self.start_step)
        groups = {}
        for item in items:
            spec = self._layout.slots[item[0]]
            groups.setdefault((spec.size, spec.dtype), []).append(item)
        results, rejected = {}, {}
        for (size, dtype), members in groups.items():
            stats, previous = [], []
            for slot, begin, end in members:
                whole = begin == 0 and end == self._layout.slots[slot].count
                stat = tf.cast(statistic(slot), dtype)
                (old,) = current(slot)
                stats.append(stat if whole else stat[begin:end])
                previous.append(old if whole else old[begin:end])
            stats, old = concat_rows(stats), concat_rows(previous)
            identity = tf.range(size)[None, :] + tf.zeros_like(old[:, 0, :1], tf.int32)
            finite = tf.reduce_all(tf.math.is_finite(stats), axis=[-2, -1])
            safe = tf.where(finite[:, None, None], stats, tf.zeros_like(stats))
            basis, order = tf.cond(
                first,
                lambda s=safe, i=identity: (kernels.eigenbasis(s), i),
                lambda s=safe, q=old: kernels.refined_basis(s, q),
            )
            ok = finite & tf.reduce_all(tf.math.is_finite(basis), axis=[-2, -1])
            basis = tf.where(ok[:, None, None], basis, old)
            order = tf.where(ok[:, None], order, identity)
            sizes = [end - begin for _, begin, end in members]
            for item, b, o, flags in zip(
                members,
                split_rows(basis, sizes),
                split_rows(order, sizes),
                split_rows(~ok, sizes),
            ):
                results[item] = (b, o)
                rejected[item] = flags
        return results, rejected

    def store_refreshed(self, results, refresh_step):
        orders = {}
        for slot, (basis, order) in results.items():
            variable = self._bases[slot]
            self.assign(variable, tf.cast(basis, variable.dtype))
            orders[slot] = order
        # At the first basis the moments start afresh (as in the authors'
        # code); later refreshes reorder the second moments with the columns
        # and project the first moment into the new bases.
        stacked = [
            k for k, part in enumerate(self._layout.parts) if part.kind == "stack"
        ]

        def afresh():
            for key in stacked:
                for state in (
                    self._second_moments,
                    self._momentums,
                    self._rotated_momentums,
                    self._graft_moments,
                ):
                    if state:
                        self.assign(state[key], tf.zeros_like(state[key]))

        def carried():
            permuted = kernels.permute_axes(
                self._layout,
                {k: read(self._second_moments[k]) for k in stacked},
                orders,
            )
            for key in stacked:
                self.assign(self._second_moments[key], permuted[key])
            if self._rotated_momentums:
                rotated = kernels.rotate_parts(
                    self._layout,
                    {k: read(self._momentums[k]) for k in stacked},
                    [read(b) for b in self._bases],
                )
                for key in stacked:
                    self.assign(self._rotated_momentums[key], rotated[key])

        tf.cond(tf.equal(refresh_step, self.start_step), afresh, carried)

    def update_step(self, gradient, variable, learning_rate):
        """SOAP's update of one variable from its aggregated `gradient`: Adam's
        moments in the eigenbasis, grafted to Adam's step length (the class
        docstring has the rule)."""
        self.update_all([gradient], [variable], learning_rate)

    def update_all(self, grads, variables, learning_rate):
        indices = [self._get_variable_index(v) for v in variables]
        by_index = dict(zip(indices, variables))
        momenta, rotated, second_moments, grafts, deltas = kernels.update(
            self._layout,
            self._hyper,
            {i: dense(g, v) for i, g, v in zip(indices, grads, variables)},
            [read(m) for m in self._momentums],
            [None if v is None else read(v) for v in self._rotated_momentums] or None,
            [read(v) for v in self._second_moments],
            [read(b) for b in self._bases],
            self.step_number(),
            learning_rate,
            [None if v is None else read(v) for v in self._graft_moments],
        )
        for key, value in momenta.items():
            self.assign(self._momentums[key], value)
        for key, value in rotated.items():
            self.assign(self._rotated_momentums[key], value)
        for key, value in second_moments.items():
            self.assign(self._second_moments[key], value)
        for key, value in grafts.items():
            self.assign(self._graft_moments[key], value)
        for index, delta in deltas.items():
            self.assign_sub(by_index[index], delta)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta1": self.beta1,
                "beta2": self.beta2,
                "shampoo_beta": self.shampoo_beta,
                "epsilon": self.epsilon,
                "grafting": self.grafting,
            }
        )
        return config
