"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner."""

import keras
import tensorflow as tf

from tf_secondorder.optimizers import _soap_kernels as kernels
from tf_secondorder.optimizers import _validate
from tf_secondorder.optimizers._blocked import (
    BlockedPreconditioner,
    dense,
    read,
    slot_prefix,
)
from tf_secondorder.optimizers.shampoo import STATISTICS_DTYPES


@keras.saving.register_keras_serializable(package="tf_secondorder")
class SOAP(BlockedPreconditioner):
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
        θ ← θ − lr·√(1 − β2^t)/(1 − β1^t) · U

    Before the first refresh (and for parameters with no preconditioned
    dimension) this is Adam. Keeping m unrotated (as the authors' code does)
    makes it exact across basis changes; between refreshes it equals running
    Adam's first moment on G'. A refresh whose matrices are non-finite is
    rejected (the old basis kept, `root_failures` incremented); a step with a
    NaN/Inf gradient is skipped and counted in `nonfinite_steps`. Under
    MirroredStrategy / MultiWorkerMirroredStrategy the refresh is split
    across replicas like Shampoo's roots (`distribute_roots`).

    Args:
        learning_rate: float, schedule or callable. Defaults to `0.003`.
        beta1: decay of the first moment, in `[0, 1)`. Defaults to `0.95`.
        beta2: decay of the second moment, in `[0, 1)`. Defaults to `0.95`.
        shampoo_beta: decay of the statistics, in `(0, 1]`; `None` means
            `beta2`.
        epsilon: added to √v. Defaults to `1e-8`.
        block_size: longest block side. Defaults to `1024`.
        precondition_frequency: steps between basis refreshes. Defaults to 10.
        start_preconditioning_step: first (1-based) step with a basis, from
            the statistics including that step's gradient. Defaults to `1`.
        statistics_frequency: update the statistics only on steps t with
            t % statistics_frequency == 0. Defaults to `1`.
        max_preconditioned_dim: dimensions longer than this (after merging)
            keep the identity basis. `None`: no limit.
        statistics_dtype: `None`/`"float32"` or `"bfloat16"` (stochastic
            rounding), as in Shampoo.
        distribute_roots: `"auto"`, `True` or `False`, as in Shampoo.
        compression, error_feedback, aggregation: what replicas send each
            other, as for every tf_secondorder optimizer.
        average_every, average_warmup_steps: local SGD, as for every
            tf_secondorder optimizer (`None` = off).
        saddle_escape: `None` or a `tfso.SaddleEscape`: a random perturbation
            when the gradient norm stays small (leaves strict saddles).
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as for every
            `keras.optimizers.Optimizer`.

    References:
        - Vyas, Morwani, Zhao, Shapira, Brandfonbrener, Janson, Kakade (2024).
          SOAP: Improving and Stabilizing Shampoo using Adam. arXiv:2409.11321.
        - Gupta, Koren, Singer (2018). Shampoo. arXiv:1802.09568.
    """

    exponent_override = None

    def __init__(
        self,
        learning_rate=0.003,
        beta1=0.95,
        beta2=0.95,
        shampoo_beta=None,
        epsilon=1e-8,
        block_size=1024,
        precondition_frequency=10,
        start_preconditioning_step=1,
        statistics_frequency=1,
        max_preconditioned_dim=None,
        statistics_dtype=None,
        distribute_roots="auto",
        compression=None,
        error_feedback=None,
        aggregation="mean",
        average_every=None,
        average_warmup_steps=0,
        saddle_escape=None,
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
        _validate.learning_rate(learning_rate)
        super().__init__(
            learning_rate=learning_rate,
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
        self.beta1 = _validate.in_range("beta1", beta1, 0.0, 1.0, high_open=True)
        self.beta2 = _validate.in_range("beta2", beta2, 0.0, 1.0, high_open=True)
        self.shampoo_beta = None
        if shampoo_beta is not None:
            self.shampoo_beta = _validate.in_range(
                "shampoo_beta", shampoo_beta, 0.0, 1.0, low_open=True
            )
        self.epsilon = _validate.in_range("epsilon", epsilon, 0.0, None)
        self.block_size = _validate.integer("block_size", block_size, 1)
        self.precondition_frequency = _validate.integer(
            "precondition_frequency", precondition_frequency, 1
        )
        self.start_preconditioning_step = _validate.integer(
            "start_preconditioning_step", start_preconditioning_step, 1
        )
        self.statistics_frequency = _validate.integer(
            "statistics_frequency", statistics_frequency, 1
        )
        self.max_preconditioned_dim = _validate.integer(
            "max_preconditioned_dim", max_preconditioned_dim, 1, optional=True
        )
        self.statistics_dtype = _validate.choice(
            "statistics_dtype", statistics_dtype, STATISTICS_DTYPES
        )
        self.distribute_roots = _validate.choice(
            "distribute_roots", distribute_roots, ("auto", True, False)
        )
        self._init_communication(
            compression,
            error_feedback,
            aggregation,
            average_every,
            average_warmup_steps,
            saddle_escape,
        )
        self.check_distribute_roots()

    @property
    def start_step(self):
        return self.start_preconditioning_step

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        statistics_beta = self.beta2 if self.shampoo_beta is None else self.shampoo_beta
        self.build_blocked(var_list, statistics_beta)
        self._bases = [
            self.add_variable(
                (factor.size, factor.size),
                initializer="identity",
                dtype=factor.dtype,
                name=f"{slot_prefix(var_list, factor)}_basis_{factor.tag}",
            )
            for factor in self._layout.factors
        ]
        self._momentums = self.add_optimizer_variables(var_list, "momentum")
        self._second_moments = self.add_optimizer_variables(
            var_list, "rotated_second_moment"
        )
        self.build_communication(var_list)
        self._hyper = kernels.Hyper(self.beta1, self.beta2, self.epsilon)

    # -- the refresh and the step -----------------------------------------

    def refreshed_shape(self, factor):
        # The basis and, as its last column, the order of the old columns.
        return (factor.size, factor.size + 1)

    def refresh_matrices(self, factor_indices):
        groups = {}
        for i in factor_indices:
            f = self._layout.factors[i]
            groups.setdefault((f.size, f.dtype), []).append(i)
        first = tf.equal(self.step_number(), self.start_step)
        packed, failures = {}, tf.constant(0, tf.int64)
        for (size, dtype), indices in groups.items():
            stats = tf.stack([tf.cast(self._statistics[i], dtype) for i in indices])
            old = tf.stack([read(self._bases[i]) for i in indices])
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
            for k, i in enumerate(indices):
                column = tf.cast(order[k], dtype)[:, None]
                packed[i] = tf.concat([basis[k], column], axis=1)
            failures += tf.reduce_sum(tf.cast(~ok, tf.int64))
        return [packed[i] for i in factor_indices], failures

    def store_refreshed(self, results):
        orders = []
        for variable, packed in zip(self._bases, results):
            self.assign(variable, tf.cast(packed[:, :-1], variable.dtype))
            orders.append(tf.cast(packed[:, -1], tf.int32))
        for plan, second_moment in zip(self._layout.plans, self._second_moments):
            if plan.factors:
                own = [orders[f.index] for f in plan.factors]
                self.assign(
                    second_moment,
                    kernels.permute_axes(plan, read(second_moment), own),
                )

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        plan = self._layout.plans[index]
        momentum, second_moment = self._momentums[index], self._second_moments[index]
        new_momentum, new_second_moment, delta = kernels.update(
            plan,
            self._hyper,
            dense(gradient, variable),
            read(momentum),
            read(second_moment),
            [read(self._bases[f.index]) for f in plan.factors],
            self.step_number(),
            learning_rate,
        )
        self.assign(momentum, new_momentum)
        self.assign(second_moment, new_second_moment)
        self.assign_sub(variable, delta)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta1": self.beta1,
                "beta2": self.beta2,
                "shampoo_beta": self.shampoo_beta,
                "epsilon": self.epsilon,
                "block_size": self.block_size,
                "precondition_frequency": self.precondition_frequency,
                "start_preconditioning_step": self.start_preconditioning_step,
                "statistics_frequency": self.statistics_frequency,
                "max_preconditioned_dim": self.max_preconditioned_dim,
                "statistics_dtype": self.statistics_dtype,
                "distribute_roots": self.distribute_roots,
                **self.communication_config(),
            }
        )
        return config
