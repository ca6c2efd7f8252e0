"""What Shampoo and SOAP share: per-block Kronecker statistics and a refresh.

Both keep, for every block of every parameter, one statistic per preconditioned
axis (S ← β·S + (1 − β)·G_(i) G_(i)ᵀ, from the all-reduced gradient), and every
N steps replace one matrix per statistic (Shampoo: an inverse root; SOAP: an
eigenbasis). The step runs in cross-replica context (Keras's `apply`, after
`merge_call`), so the refresh's `tf.cond` may hold the all_gather that splits
the refresh across replicas (SPEC §3.4, §5).
"""

import keras
import tensorflow as tf

from tf_secondorder.distribute import Communication, sharded
from tf_secondorder.linalg import greedy_partition, root_cost
from tf_secondorder.optimizers import _shampoo_kernels as kernels
from tf_secondorder.optimizers._shampoo_layout import ShampooLayout


class BlockedPreconditioner(Communication, keras.optimizers.Optimizer):
    """Base of Shampoo and SOAP. Subclasses set `block_size`,
    `max_preconditioned_dim`, `exponent_override`, `statistics_dtype`,
    `statistics_frequency`, `precondition_frequency`, `start_step`,
    `distribute_roots`, call `build_blocked` in `build`, and implement
    `refresh_matrices` / `store_refreshed` / `update_step`."""

    @property
    def root_failures(self):
        """Refreshed matrices rejected so far (a variable saved with the state)."""
        return self._root_failures

    @property
    def nonfinite_steps(self):
        """Steps skipped because a gradient had NaN/Inf."""
        return self._nonfinite_steps

    def build_blocked(self, var_list, statistics_beta):
        self._layout = ShampooLayout(
            [v.shape for v in var_list],
            self.block_size,
            self.max_preconditioned_dim,
            self.exponent_override,
            [compute_dtype(v) for v in var_list],
        )
        self._statistics = []
        for factor in self._layout.factors:
            self._statistics.append(
                self.add_variable(
                    (factor.size, factor.size),
                    initializer="zeros",
                    dtype=self.statistics_dtype or factor.dtype,
                    name=f"{slot_prefix(var_list, factor)}_statistics_{factor.tag}",
                )
            )
        self._root_failures = self.add_variable(
            (),
            initializer="zeros",
            dtype="int64",
            name="root_failures",
            aggregation="only_first_replica",
        )
        self._nonfinite_steps = self.add_variable(
            (),
            initializer="zeros",
            dtype="int64",
            name="nonfinite_steps",
            aggregation="only_first_replica",
        )
        self._statistics_hyper = kernels.Hyper(
            beta1=0.0,
            beta2=statistics_beta,
            grafting=None,
            grafting_epsilon=0.0,
            nesterov=False,
            start_step=self.start_step,
            bfloat16_statistics=self.statistics_dtype == "bfloat16",
        )

    def check_distribute_roots(self):
        if self.distribute_roots is True and self.average_every is not None:
            raise ValueError(
                "`distribute_roots=True` shares roots computed from common "
                "statistics; under local SGD (`average_every`) each replica "
                "has its own. Use distribute_roots='auto' or False. Received: "
                f"distribute_roots=True, average_every={self.average_every}"
            )

    def step_number(self):
        # int32: modular arithmetic on int64 is not available on TPU.
        return tf.cast(self.iterations, tf.int32) + 1

    def apply_update(self, distribution, grads_and_vars, learning_rate):
        """Statistics, then (on refresh steps) the refresh, then each variable.

        A step with any non-finite gradient is skipped as a whole and counted
        (one guard for the step: per-variable conds made tracing ~3x slower).
        """
        finite = tf.constant(True)
        # Reduced gradients are equal on every replica; local-SGD ones are
        # not, and one replica's NaN must stop every replica's step.
        replicas = slice(None) if self.averages_locally(distribution) else slice(1)
        for grad, var in grads_and_vars:
            for local in distribution.experimental_local_results(grad)[replicas]:
                finite &= kernels.all_finite(dense(local, var))

        def update_statistics():
            for grad, var in grads_and_vars:
                distribution.extended.update(
                    var, self._update_statistics, args=(grad,), group=False
                )

        def step():
            number = self.step_number()
            if self.statistics_frequency == 1:
                update_statistics()
            else:
                tf.cond(
                    number % self.statistics_frequency == 0, update_statistics, no_op
                )
            since_start = number - self.start_step
            due = (since_start >= 0) & (since_start % self.precondition_frequency == 0)
            tf.cond(due, lambda: self._refresh(distribution), no_op)
            self.update_variables(distribution, grads_and_vars, learning_rate)

        def skip():
            self._nonfinite_steps.assign_add(1)

        tf.cond(finite, step, skip)

    def _update_statistics(self, variable, gradient):
        plan = self._layout.plans[self._get_variable_index(variable)]
        if not plan.factors:
            return
        stats = [self._statistics[f.index] for f in plan.factors]
        values = kernels.updated_statistics(
            plan,
            self._statistics_hyper,
            dense(gradient, variable),
            [read(s) for s in stats],
            self.step_number(),
        )
        for stat, value in zip(stats, values):
            self.assign(stat, value)

    def refreshed_shape(self, factor):
        """Static shape of `refresh_matrices`' result for one factor."""
        return (factor.size, factor.size)

    def refresh_matrices(self, factor_indices):
        """(one new tensor per factor index, number rejected); a rejected one
        must equal what the factor holds now. Runs on one replica's device."""
        raise NotImplementedError

    def store_refreshed(self, results):
        """Assigns the refreshed tensors (a list over all factors)."""
        raise NotImplementedError

    def _refresh(self, distribution):
        factors = self._layout.factors
        everything = list(range(len(factors)))
        if not factors:
            return
        if self.averages_locally(distribution):
            # Local SGD: each replica refreshes from its own statistics.
            # Inside `extended.update` reads and assignments of mirrored
            # variables act on the replica being updated.
            def own_refresh(_):
                self._store(*self.refresh_matrices(everything))

            distribution.extended.update(
                self._statistics[0].value, own_refresh, group=False
            )
        elif not sharded.splits_work(distribution, self.distribute_roots):
            self._store(*self.refresh_matrices(everything))
        else:
            shares = greedy_partition(
                [root_cost(f.size) for f in factors],
                distribution.num_replicas_in_sync,
            )
            shapes = {i: self.refreshed_shape(factors[i]) for i in everything}
            widest = max((f.dtype for f in factors), key=lambda d: tf.as_dtype(d).size)
            by_index, failures = sharded.run_sharded(
                distribution, shares, shapes, self.refresh_matrices, widest
            )
            self._store([by_index[i] for i in everything], failures)

    def _store(self, results, failures):
        self.store_refreshed(results)
        self._root_failures.assign_add(tf.cast(failures, tf.int64))


def slot_prefix(var_list, factor):
    variable = var_list[factor.variable]
    path = getattr(variable, "path", None) or variable.name
    return path.replace("/", "_").replace(":", "_")


def compute_dtype(variable):
    """float64 for float64 models, float32 otherwise (also under mixed precision)."""
    return "float64" if variable.dtype == "float64" else "float32"


def read(variable):
    """The variable's value as a tensor (Keras variable arithmetic would round
    Python-float coefficients through floatx)."""
    return tf.convert_to_tensor(variable)


def dense(gradient, variable):
    """The gradient as a dense tensor of the variable's dtype and static shape
    (embedding gradients arrive as tf.IndexedSlices)."""
    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.reshape(tf.convert_to_tensor(gradient), variable.shape)
    return tf.cast(gradient, variable.dtype)


def no_op():
    return None
