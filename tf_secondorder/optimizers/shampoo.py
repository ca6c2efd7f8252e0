"""Blocked, grafted Shampoo with roots recomputed every N steps."""

import keras
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.linalg import ROOT_METHODS, inverse_pth_root, resolve_root_method
from tf_secondorder.optimizers.preconditioned import PreconditionedOptimizer
from tf_secondorder.optimizers.tensors import (
    compute_dtype,
    concat_rows,
    dense,
    read,
    split_rows,
    stacked_identity,
)
from tf_secondorder.preconditioning import shampoo as kernels
from tf_secondorder.preconditioning.layout import BlockLayout

GRAFTING_TYPES = ("sgd", "adagrad", "rmsprop", "adam", None)
PRECONDITIONER_DTYPES = (None, "float32", "bfloat16")


@keras.saving.register_keras_serializable(package="tf_secondorder")
class Shampoo(PreconditionedOptimizer):
    """Blocked Shampoo with grafting, momentum and decoupled weight decay.

    Each parameter is reshaped (size-1 dims squeezed, adjacent small dims
    merged while their product is at most `block_size`) and cut into blocks of
    at most `block_size` per side. For a block G of order k, each dimension i
    (of length at most `max_preconditioned_dim`) keeps a statistic

        S_i ← β_s·S_i + (1 − β_s)·G_(i) G_(i)ᵀ     (β_s = 1: a plain sum)

    where G_(i) is G unfolded along dimension i. At steps `start`,
    `start + N`, `start + 2N`, ... (N = `precondition_frequency`) every
    preconditioner is recomputed as P_i = (S_i + ε·λ_max(S_i)·I)^(−1/p) with
    p = `exponent_override` (default 2), batched over blocks of equal size; a new
    root that is non-finite or inaccurate is rejected, the previous one kept
    and `root_failures` incremented. The step is then

        D = G ×_1 P_1 ×_2 P_2 ... ×_k P_k          (from step `start` on)
        D ← D · ‖U‖ / (‖D‖ + 1e−16)                (grafting, per block)
        m ← β1·m + (1 − β1)·D;  θ ← θ − lr · m / (1 − β1^t)

    where U is the grafting optimizer's update for the block (`"sgd"`: G;
    `"adagrad"`: G/(√Σg² + ε_g); `"rmsprop"`: G/(√v + ε_g) with
    v ← β2·v + (1 − β2)·g²; `"adam"`: the same with v bias-corrected; with
    β2 = 1 these accumulate sums). Before `start`, D = U. With Nesterov the
    last line uses β1·m + (1 − β1)·D. Weight decay is Keras's decoupled one.
    A step in which any gradient has NaN/Inf is skipped as a whole (weights
    and state unchanged) and counted in `nonfinite_steps`.

    Args:
        learning_rate: float, schedule or callable. Defaults to `0.001`.
        beta1: momentum of the update, in `[0, 1)`. Defaults to `0.9`.
        beta2: decay of the grafting optimizer's second moment, in
            `(0, 1]`. Defaults to `0.95` (SOAP's β2 too): the grafted norm
            ‖U‖ of each block then follows the gradient's recent scale, not
            its average over ~1000 steps, and tracks a loss that falls
            fast (docs/shampoo.md has the measurements).
        shampoo_beta: β_s, the decay of the statistics, in `(0, 1]`; `None`
            means `beta2`. Defaults to `0.95` (SOAP's default too): with
            statistics every 5 steps the roots see about the last 100
            steps: the roots of older statistics describe a curvature the
            weights have left, and shorter memories make them noisy.
        epsilon: ridge relative to the largest eigenvalue. Defaults to
            `1e-4`: a bfloat16 forward and backward pass (`mixed_bfloat16`)
            rounds each gradient entry by up to 2^−9 relative, a floor of
            noise under the statistics' small eigenvalues (~2^−18 of their
            mean, more after the matmuls' rounding) that an inverse square
            root would multiply by up to ε^(−1/2); 1e-4 caps that at 100×,
            and keeps float32 roots (κ ≤ 1e4) accurate.
        block_size: longest block side. Defaults to `256`: the per-step
            preconditioning costs ~4·b per parameter (b³ per b×b block), a
            refresh ~b³ per block; 256 keeps both below the forward and
            backward pass of typical layers and still couples 256 rows.
        precondition_frequency: steps between root refreshes. Defaults to `100`.
        start_preconditioning_step: first preconditioned step (1-based);
            `None` means `precondition_frequency`.
        statistics_frequency: after the first refresh, update the statistics
            only on steps t with t % statistics_frequency == 0 (before it,
            every step). Their cost is ~2(m+n)/(3·tokens)
            of a step's forward+backward, large at small batches; the EMA
            horizon becomes statistics_frequency/(1 − β_s) steps. Defaults to
            `5`: statistics change slowly next to the roots' refresh period,
            so every fifth gradient describes them as well, at a fifth of
            the cost.
        grafting: `"sgd"`, `"adagrad"`, `"rmsprop"`, `"adam"` or `None`.
        grafting_epsilon: ε_g of the grafting optimizer. Defaults to `1e-8`.
        nesterov: Nesterov momentum. Defaults to `False`.
        exponent_override: integer p of every root, or `None` for the
            original Shampoo's p = 2k (k: the block's preconditioned axes).
            Defaults to `2`: each axis's statistic to the power −1/2, so
            that P_1 ⊗ ... ⊗ P_k approximates full-matrix AdaGrad's
            (E[g gᵀ])^(−1/2) (Morwani et al. 2024; grafting sets the scale),
            a stronger correction than p = 2k's.
        max_preconditioned_dim: dimensions longer than this (after merging)
            are not preconditioned, e.g. a vocabulary. `None`: no limit.
        root_method: `"eigh"`, `"coupled_newton"` or `"auto"` (coupled Newton
            on TPU, eigh elsewhere).
        statistics_dtype: `None`/`"float32"`, or `"bfloat16"` to store the
            statistics in half the memory (updated with stochastic rounding,
            so small EMA increments are not lost).
        preconditioner_dtype: `None`/`"float32"`, or `"bfloat16"` to store
            the roots in half the memory. They are computed in float32 and
            used in float32; storing rounds each entry to 8 bits of
            mantissa, a relative change of at most 2^−9 in the step's
            direction per entry, which grafting's rescaling does not amplify.
        packed_statistics: store each statistic once, as its upper
            triangle (n(n+1)/2 numbers instead of n²): about half their
            memory, exactly the same numbers, for one gather per statistic
            read or written. Defaults to `False`.
        precondition_1d: whether vectors (at most one dimension longer than
            1: biases, normalization scales) get full-matrix statistics.
            Defaults to `False`: they get the grafting update alone, as in
            the SOAP authors' code: a vector's n×n matrix costs n times its
            size in state and a root of its own, and a bias gains little
            from coupling its entries.
        distribute_roots: `"auto"`, `True` or `False`. With more than one
            replica under MirroredStrategy or MultiWorkerMirroredStrategy
            (`"auto"` or `True`), the stacked factors are cut into row ranges
            assigned to replicas by cost (rows · n³, largest first to the
            least loaded); at a refresh (or a pipelined install) each
            replica computes only its share and the results are
            all-gathered, so the refresh work per replica falls ~1/N.
            `False`: every host computes all roots.
        root_refresh: `"auto"`, `"pipelined"` or `"in_step"`. Pipelined:
            at a refresh step t the statistics are snapshotted, the host
            computes the new roots while training goes on with the old
            ones (a background thread running a CPU-placed `tf.function`;
            `fit` drives it, a custom loop calls `advance_root_pipeline`),
            and they are installed before step t + `refresh_delay` on every
            replica and worker (`optimizers/host.py` says by whom); a step
            whose roots are late waits (`refresh_waits`). The accelerator
            never computes an eigendecomposition, and a
            refresh step costs about an ordinary one. In the step: step t
            computes and installs them. `"auto"`: pipelined, except under
            local SGD (each replica refreshes from its own statistics).
        refresh_delay: d, steps between a pipelined refresh's statistics
            and the first step using its roots, in
            `[1, precondition_frequency]`; `None`: 10, or the frequency if
            smaller. Until the first roots arrive the update is grafting's.
        compression, error_feedback, aggregation, average_every,
        average_warmup_steps, saddle_escape: what replicas send each other
            (`tfso.distribute.CommunicationConfig`). Under local SGD each
            replica computes roots from its own statistics.
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as for every
            `keras.optimizers.Optimizer`.

    References:
        - Gupta, Koren, Singer (2018). Shampoo: Preconditioned Stochastic
          Tensor Optimization. arXiv:1802.09568.
        - Anil, Gupta, Koren, Regan, Singer (2020). Scalable Second Order
          Optimization for Deep Learning. arXiv:2002.09018.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta1=0.9,
        beta2=0.95,
        shampoo_beta=0.95,
        epsilon=1e-4,
        block_size=256,
        precondition_frequency=100,
        start_preconditioning_step=None,
        statistics_frequency=5,
        grafting="adam",
        grafting_epsilon=1e-8,
        nesterov=False,
        exponent_override=2,
        max_preconditioned_dim=None,
        root_method="auto",
        statistics_dtype=None,
        distribute_roots="auto",
        precondition_1d=False,
        preconditioner_dtype=None,
        packed_statistics=False,
        root_refresh="auto",
        refresh_delay=None,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="shampoo",
        **kwargs,
    ):
        validation.learning_rate(learning_rate)
        options = {
            "beta1": validation.number("beta1", beta1, 0.0, 1.0, high_open=True),
            "beta2": validation.number("beta2", beta2, 0.0, 1.0, low_open=True),
            "shampoo_beta": validation.number(
                "shampoo_beta", shampoo_beta, 0.0, 1.0, low_open=True, optional=True
            ),
            "epsilon": validation.number("epsilon", epsilon, 0.0),
            "grafting": validation.choice("grafting", grafting, GRAFTING_TYPES),
            "grafting_epsilon": validation.number(
                "grafting_epsilon", grafting_epsilon, 0.0, low_open=True
            ),
            "nesterov": validation.boolean("nesterov", nesterov),
            "exponent_override": validation.integer(
                "exponent_override", exponent_override, 1, 64, optional=True
            ),
            "root_method": validation.choice("root_method", root_method, ROOT_METHODS),
            "preconditioner_dtype": validation.choice(
                "preconditioner_dtype", preconditioner_dtype, PRECONDITIONER_DTYPES
            ),
        }
        super().__init__(
            learning_rate=learning_rate,
            block_size=block_size,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
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
        if self.start_preconditioning_step is None:
            return self.precondition_frequency
        return self.start_preconditioning_step

    @property
    def statistics_beta(self):
        return self.beta2 if self.shampoo_beta is None else self.shampoo_beta

    def make_layout(self, var_list):
        return BlockLayout(
            [v.shape for v in var_list],
            self.block_size,
            self.max_preconditioned_dim,
            self.exponent_override,
            [compute_dtype(v) for v in var_list],
            preconditioned=[self.is_preconditioned(v) for v in var_list],
        )

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._preconditioners = [
            self.add_variable(
                (slot.count, slot.size, slot.size),
                initializer=stacked_identity,
                dtype=self.preconditioner_dtype or slot.dtype,
                name=self.slot_variable_name(slot, "preconditioner"),
            )
            for slot in self._layout.slots
        ]
        # Grafting and momentum per part of the layout (a group's stacked
        # blocks, or the flat vector of the variables without factors): one
        # variable and one elementwise update per part, not per variable.
        self._grafting_accumulators = []
        if self.grafting in ("adagrad", "rmsprop", "adam"):
            self._grafting_accumulators = self.add_part_variables(
                "grafting_accumulator"
            )
        self._momentums = []
        if self.beta1 > 0:
            self._momentums = self.add_part_variables("momentum")
        self._resolved_root_method = resolve_root_method(self.root_method)
        self._hyper = kernels.Hyper(
            beta1=self.beta1,
            beta2=self.beta2,
            grafting=self.grafting,
            grafting_epsilon=self.grafting_epsilon,
            nesterov=self.nesterov,
            start_step=self.first_preconditioned_step,
        )

    # -- the refresh and the step -----------------------------------------

    def refresh_specs(self, slot, rows):
        size = self._layout.slots[slot].size
        return (((rows, size, size), self._layout.slots[slot].dtype),)

    def stored_dtypes(self, slot):
        return (self.preconditioner_dtype or self._layout.slots[slot].dtype,)

    def current_refreshed(self, slot):
        return (read(self._preconditioners[slot]),)

    def refresh(self, items, statistic, current, refresh_step):
        """Inverse roots of rows of slots' statistics: one batched op per
        matrix size and exponent, over every item of that size. A rejected
        root is the row's current preconditioner."""
        groups = {}
        for item in items:
            spec = self._layout.slots[item[0]]
            groups.setdefault((spec.size, spec.exponent, spec.dtype), []).append(item)
        roots, rejected = {}, {}
        for (_, exponent, dtype), members in groups.items():
            dtype = tf.as_dtype(dtype)
            stats, previous = [], []
            for slot, begin, end in members:
                whole = begin == 0 and end == self._layout.slots[slot].count
                (old,) = current(slot)
                stat = tf.cast(statistic(slot), dtype)
                old = tf.cast(old, dtype)
                stats.append(stat if whole else stat[begin:end])
                previous.append(old if whole else old[begin:end])
            new, ok, _ = inverse_pth_root(
                concat_rows(stats),
                exponent,
                self.epsilon,
                self._resolved_root_method,
                compute_dtype=dtype,
            )
            chosen = tf.where(ok[:, None, None], new, concat_rows(previous))
            sizes = [end - begin for _, begin, end in members]
            for item, root, flags in zip(
                members, split_rows(chosen, sizes), split_rows(~ok, sizes)
            ):
                roots[item] = (root,)
                rejected[item] = flags
        return roots, rejected

    def store_refreshed(self, results, refresh_step):
        for slot, (root,) in results.items():
            variable = self._preconditioners[slot]
            self.assign(variable, tf.cast(root, variable.dtype))

    def update_step(self, gradient, variable, learning_rate):
        """Shampoo's update of one variable from its aggregated `gradient`:
        statistics, the preconditioned and grafted direction, momentum, weight
        decay and the learning rate (the class docstring has the rule)."""
        self.update_all([gradient], [variable], learning_rate)

    def update_all(self, grads, variables, learning_rate):
        indices = [self._get_variable_index(v) for v in variables]
        by_index = dict(zip(indices, variables))
        accumulators, momenta, deltas = kernels.update(
            self._layout,
            self._hyper,
            {i: dense(g, v) for i, g, v in zip(indices, grads, variables)},
            [read(a) for a in self._grafting_accumulators] or None,
            [read(m) for m in self._momentums] or None,
            [read(p) for p in self._preconditioners],
            self.step_number(),
            learning_rate,
        )
        for key, value in (accumulators or {}).items():
            self.assign(self._grafting_accumulators[key], value)
        for key, value in (momenta or {}).items():
            self.assign(self._momentums[key], value)
        for index, delta in deltas.items():
            self.assign_sub(by_index[index], delta)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Before `shampoo_beta` existed the statistics decayed with `beta2`.
        config = {"shampoo_beta": None, **config}
        return super().from_config(config, custom_objects=custom_objects)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta1": self.beta1,
                "beta2": self.beta2,
                "shampoo_beta": self.shampoo_beta,
                "epsilon": self.epsilon,
                "grafting": self.grafting,
                "grafting_epsilon": self.grafting_epsilon,
                "nesterov": self.nesterov,
                "exponent_override": self.exponent_override,
                "root_method": self.root_method,
                "preconditioner_dtype": self.preconditioner_dtype,
            }
        )
        return config
