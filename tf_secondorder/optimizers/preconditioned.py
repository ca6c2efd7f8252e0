"""What Shampoo and SOAP share: blocked Kronecker statistics and their refresh.

Both keep, for every block of every parameter, one statistic per preconditioned
axis (S ← β·S + (1 − β)·G_(i) G_(i)ᵀ, from the reduced gradient), and every
N steps replace one or more tensors per statistic (Shampoo: an inverse root;
SOAP: an eigenbasis and the order of its columns). The update runs in
cross-replica context (after Keras's merge_call), so the refresh's `tf.cond`
may hold the all_gather that splits the refresh across replicas.
"""

import keras
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compat.graph import in_xla_context
from tf_secondorder.distribute import sharding
from tf_secondorder.linalg import pack_symmetric, packed_size, unpack_symmetric
from tf_secondorder.optimizers.base import CommunicatingOptimizer, slot_name
from tf_secondorder.optimizers.tensors import (
    compute_dtype,
    dense,
    no_op,
    read,
    static_shapes,
)
from tf_secondorder.preconditioning import kronecker
from tf_secondorder.preconditioning.layout import BlockLayout

STATISTICS_DTYPES = (None, "float32", "bfloat16")
DISTRIBUTE_ROOTS = ("auto", True, False)


class PreconditionedOptimizer(CommunicatingOptimizer, keras.optimizers.Optimizer):
    """Base of Shampoo and SOAP.

    Subclasses pass the shared options below to `__init__`, define
    `statistics_beta`, `start_step`, `refresh_specs`, `refresh` and
    `store_refreshed`, add their own slots in `build` after `super().build`,
    and implement `update_step`.

    Args:
        block_size, precondition_frequency, start_preconditioning_step,
        statistics_frequency, max_preconditioned_dim, statistics_dtype,
        distribute_roots, precondition_1d, packed_statistics: as documented
            by Shampoo and SOAP.
    """

    def __init__(
        self,
        *,
        block_size,
        precondition_frequency,
        start_preconditioning_step,
        statistics_frequency,
        max_preconditioned_dim,
        statistics_dtype,
        distribute_roots,
        precondition_1d,
        packed_statistics,
        **kwargs,
    ):
        options = {
            "block_size": validation.size("block_size", block_size),
            "precondition_frequency": validation.integer(
                "precondition_frequency", precondition_frequency, 1
            ),
            "start_preconditioning_step": validation.integer(
                "start_preconditioning_step",
                start_preconditioning_step,
                1,
                optional=True,
            ),
            "statistics_frequency": validation.integer(
                "statistics_frequency", statistics_frequency, 1
            ),
            "max_preconditioned_dim": validation.size(
                "max_preconditioned_dim", max_preconditioned_dim, optional=True
            ),
            "statistics_dtype": validation.choice(
                "statistics_dtype", statistics_dtype, STATISTICS_DTYPES
            ),
            "distribute_roots": validation.choice(
                "distribute_roots", distribute_roots, DISTRIBUTE_ROOTS
            ),
            "precondition_1d": validation.boolean("precondition_1d", precondition_1d),
            "packed_statistics": validation.boolean(
                "packed_statistics", packed_statistics
            ),
        }
        if distribute_roots is True and kwargs.get("average_every") is not None:
            validation.fail(
                "distribute_roots",
                "'auto' or False under local SGD (`average_every`): roots "
                "shared across replicas need common statistics, and each "
                "replica has its own",
                True,
            )
        super().__init__(**kwargs)
        for name, value in options.items():
            setattr(self, name, value)

    @property
    def root_failures(self):
        """Refreshed matrices rejected so far (a variable saved with the state)."""
        return self._root_failures

    @property
    def refreshes(self):
        """Refreshes so far (a variable)."""
        return self._refreshes

    @property
    def refresh_seconds(self):
        """Wall seconds spent in refreshes so far by this process, timed in
        the graph (a float64 variable; stays 0 under XLA compilation, which
        has no clock op). Not saved with the state: it differs from run to
        run and worker to worker."""
        return self._refresh_clock.seconds

    @property
    def statistics_beta(self):
        raise NotImplementedError

    @property
    def start_step(self):
        raise NotImplementedError

    def make_layout(self, var_list):
        return BlockLayout(
            [v.shape for v in var_list],
            self.block_size,
            self.max_preconditioned_dim,
            dtypes=[compute_dtype(v) for v in var_list],
            preconditioned=[self.is_preconditioned(v) for v in var_list],
        )

    def exclude_from_preconditioning(self, var_list=None, var_names=None):
        """Leaves variables out of preconditioning: they get the grafting
        update alone (with the default `grafting="adam"`, Adam's update),
        and no statistics or roots are kept for them. Shampoo for the
        matrices and Adam for the embeddings in one model, say:
        `optimizer.exclude_from_preconditioning(var_names=["embedding"])`.

        Like Keras's `exclude_from_weight_decay`, call it before the
        optimizer is built (before `fit`, after `compile`).

        Args:
            var_list: variables to leave out.
            var_names: strings; a variable whose path (e.g.
                "token_embedding/embeddings") contains any of them is left out.
        """
        if self.built:
            raise ValueError(
                "`exclude_from_preconditioning()` must be called before the "
                "optimizer is built; it is built already"
            )
        var_list = validation.sequence("var_list", var_list or [])
        var_names = validation.strings("var_names", var_names or [])
        self._unpreconditioned_keys = {self._var_key(v) for v in var_list}
        self._unpreconditioned_names = tuple(var_names)

    def is_preconditioned(self, variable):
        """False for a variable left out by `exclude_from_preconditioning`
        and, unless `precondition_1d`, for a vector (at most one dimension
        longer than 1, e.g. a bias or a normalization scale)."""
        if not self.precondition_1d and sum(int(d) > 1 for d in variable.shape) <= 1:
            return False
        if self._var_key(variable) in getattr(self, "_unpreconditioned_keys", ()):
            return False
        path = getattr(variable, "path", variable.name)
        names = getattr(self, "_unpreconditioned_names", ())
        return not any(name in path for name in names)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._layout = self.make_layout(var_list)
        self._statistics = [
            self.add_variable(
                (packed_size(factor.size),)
                if self.packed_statistics
                else (factor.size, factor.size),
                initializer="zeros",
                dtype=self.statistics_dtype or factor.dtype,
                name=slot_name(var_list[factor.variable], f"statistics_{factor.tag}"),
            )
            for factor in self._layout.factors
        ]
        counter = dict(shape=(), initializer="zeros", aggregation="only_first_replica")
        self._root_failures = self.add_variable(
            dtype="int64", name="root_failures", **counter
        )
        self._refreshes = self.add_variable(dtype="int64", name="refreshes", **counter)
        self._refresh_clock = _RefreshClock()

    def step_number(self):
        # int32: modular arithmetic on int64 is not available on TPU.
        return tf.cast(self.iterations, tf.int32) + 1

    # -- the update of all variables (cross-replica context) ---------------

    def update_variables(self, distribution, grads_and_vars, learning_rate):
        """Statistics, then (on refresh steps) the refresh, then every variable.

        The per-step work runs once per replica inside `extended.update`,
        where reads and assignments of mirrored variables act on that
        replica: all variables together, so that a subclass can decide once
        for all of them (Shampoo: one `tf.cond` for the start step instead
        of one per variable) and the statistics of equal blocks from any
        variables are one batched gram each (fewer ops to trace).
        """
        number = self.step_number()
        grads = [g for g, _ in grads_and_vars]
        variables = [v for _, v in grads_and_vars]
        anchor = variables[0]
        if isinstance(anchor, keras.Variable):
            anchor = anchor.value

        def on_each_replica(fn):
            distribution.extended.update(
                anchor,
                _plain_python(lambda _, own: fn(static_shapes(own, variables))),
                args=(grads,),
                group=False,
            )

        update_statistics = lambda: on_each_replica(  # noqa: E731
            lambda own: self._update_statistics(own, variables)
        )
        if self.statistics_frequency == 1:
            update_statistics()
        else:
            # Every step up to the first refresh, so that the first roots see
            # every early gradient; then every `statistics_frequency` steps.
            tf.cond(
                (number <= self.start_step) | (number % self.statistics_frequency == 0),
                update_statistics,
                no_op,
            )
        since_start = number - self.start_step
        due = (since_start >= 0) & (since_start % self.precondition_frequency == 0)
        tf.cond(due, lambda: self._timed_refresh(distribution), no_op)
        on_each_replica(lambda own: self.update_all(own, variables, learning_rate))

    def update_all(self, grads, variables, learning_rate):
        """Every variable's update from its gradient (one replica); by
        default `update_step` for each."""
        for grad, variable in zip(grads, variables):
            self.update_step(grad, variable, learning_rate)

    def _update_statistics(self, grads, variables):
        present = {}
        for grad, variable in zip(grads, variables):
            index = self._get_variable_index(variable)
            if self._layout.plans[index].factors:
                present[index] = dense(grad, variable)
        if not present:
            return
        updated = kronecker.batched_statistics(
            self._layout,
            self.statistics_beta,
            present,
            self.statistic,
            self.step_number(),
        )
        for index, value in updated.items():
            if self.packed_statistics:
                value = pack_symmetric(value)
            self.assign(self._statistics[index], value)

    def statistic(self, index):
        """Factor `index`'s statistic as an n×n tensor in its storage dtype
        (unpacked when `packed_statistics`)."""
        value = read(self._statistics[index])
        if self.packed_statistics:
            return unpack_symmetric(value, self._layout.factors[index].size)
        return value

    # -- the refresh --------------------------------------------------------

    def refresh_specs(self, factor):
        """((shape, dtype), ...) of what `refresh` returns for one factor."""
        raise NotImplementedError

    def refresh(self, factor_indices):
        """(dict factor index -> tuple of tensors, int count rejected). A
        rejected factor's tensors must equal what it holds now. Runs on one
        replica's device."""
        raise NotImplementedError

    def store_refreshed(self, results):
        """Assigns the refreshed tensors (a list over all factors)."""
        raise NotImplementedError

    def _timed_refresh(self, distribution):
        self._refreshes.assign_add(1)
        if in_xla_context():
            self._refresh(distribution)
            return
        # Timestamps are stateful ops: automatic control dependencies keep
        # them before and after the refresh's variable assignments.
        start = tf.timestamp()
        self._refresh(distribution)
        self._refresh_clock.seconds.assign_add(tf.timestamp() - start)

    def _refresh(self, distribution):
        factors = self._layout.factors
        everything = list(range(len(factors)))
        if not factors:
            return
        if self.communicator.averages_locally(distribution):
            # Local SGD: each replica refreshes from its own statistics.
            # Inside `extended.update` reads and assignments of mirrored
            # variables act on the replica being updated.
            def own_refresh(_):
                self._store(*self.refresh(everything))

            distribution.extended.update(
                self._statistics[0].value, _plain_python(own_refresh), group=False
            )
        elif not sharding.splits_work(distribution, self.distribute_roots):
            self._store(*self.refresh(everything))
        else:
            shares = sharding.greedy_partition(
                [sharding.root_cost(f.size) for f in factors],
                distribution.num_replicas_in_sync,
            )
            specs = {i: self.refresh_specs(factors[i]) for i in everything}
            results, failures = sharding.run_sharded(
                distribution, shares, specs, self.refresh
            )
            self._store(results, failures)

    def _store(self, results, failures):
        self.store_refreshed([results[i] for i in range(len(self._layout.factors))])
        self._root_failures.assign_add(tf.cast(failures, tf.int64))

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # A config saved before `precondition_1d` existed meant vectors were
        # preconditioned; keep that, so its saved state fits the layout.
        config = {"precondition_1d": True, **config}
        return super().from_config(config, custom_objects=custom_objects)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block_size": self.block_size,
                "precondition_frequency": self.precondition_frequency,
                "start_preconditioning_step": self.start_preconditioning_step,
                "statistics_frequency": self.statistics_frequency,
                "max_preconditioned_dim": self.max_preconditioned_dim,
                "statistics_dtype": self.statistics_dtype,
                "distribute_roots": self.distribute_roots,
                "precondition_1d": self.precondition_1d,
                "packed_statistics": self.packed_statistics,
            }
        )
        return config


def _plain_python(fn):
    # `extended.update` runs its function through AutoGraph inside a
    # `tf.function`; this code has no tensor-dependent Python control flow
    # (every branch is an explicit `tf.cond`), and converting it (a few
    # hundred functions) was most of Shampoo's first-step tracing time.
    return tf.autograph.experimental.do_not_convert(fn)


class _RefreshClock:
    """Holds the refresh-seconds variable out of the optimizer's tracked
    state (a plain object: neither Keras nor tf.train.Checkpoint tracks it),
    so checkpoints, SavedModels and the replicas' state comparisons stay
    deterministic."""

    def __init__(self):
        self.seconds = tf.Variable(
            tf.constant(0.0, tf.float64), trainable=False, name="refresh_seconds"
        )
