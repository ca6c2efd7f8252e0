"""What Shampoo and SOAP share: blocked Kronecker statistics and their refresh.

Both keep, for every block of every parameter, one statistic per preconditioned
axis (S ← β·S + (1 − β)·G_(i) G_(i)ᵀ, from the reduced gradient), stacked per
layout slot (one variable [rows, n, n] per block shape and axis), and every
N steps replace one or more tensors per statistic (Shampoo: an inverse root;
SOAP: an eigenbasis and the order of its columns). When and where that
refresh runs (in the step, split across replicas, or on the host pipelined
with training) is decided by the optimizer's `RootRefresh`
(`optimizers/refresh.py`). The update runs in cross-replica context (after
Keras's merge_call), so the refresh's `tf.cond` may hold the all_gather that
splits the refresh across replicas.
"""

import keras
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.linalg import pack_symmetric, packed_size
from tf_secondorder.optimizers import preconditioning_options, refresh
from tf_secondorder.optimizers.base import CommunicatingOptimizer
from tf_secondorder.optimizers.tensors import (
    compute_dtype,
    dense,
    no_op,
    static_shapes,
    unpack,
)
from tf_secondorder.preconditioning import kronecker
from tf_secondorder.preconditioning.layout import BlockLayout


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
        root_refresh="auto",
        refresh_delay=None,
        **kwargs,
    ):
        options = preconditioning_options.validated(
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
        )
        constraints = preconditioning_options.communication_constraints(options)
        super().__init__(communication_constraints=constraints, **kwargs)
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
        """Wall seconds this process spent computing refreshes, in the step
        (not under XLA, which has no clock op) or on the host; a float64
        variable, not saved (it differs from run to run)."""
        return self._root_refresh.clock.seconds

    @property
    def statistics_beta(self):
        """Decay of the statistics' running average (the subclass's option)."""
        raise NotImplementedError

    @property
    def start_step(self):
        """First step whose update is preconditioned (the subclass's option)."""
        raise NotImplementedError

    def make_layout(self, var_list):
        """How `var_list` is reshaped and cut into blocks (`BlockLayout`)."""
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

    def apply(self, grads, trainable_variables=None):
        """Keras's `apply`. Without a strategy Keras builds the optimizer
        inside the first trace of the train step (`train_on_batch`, a
        custom `tf.function`); built here eagerly (`tf.init_scope`), the
        initial values of its stacked state are computed once, not traced
        into that graph and lifted out of it, which shortens the first
        step."""
        if (
            not self.built
            and trainable_variables is not None
            and not tf.distribute.has_strategy()
        ):
            with tf.init_scope():
                self.build(trainable_variables)
        return super().apply(grads, trainable_variables)

    def build(self, var_list):
        """The statistics, stacked per slot; subclasses add the rest."""
        if self.built:
            return
        super().build(var_list)
        self._layout = self.make_layout(var_list)
        self._statistics = [
            self.add_variable(
                (slot.count, packed_size(slot.size))
                if self.packed_statistics
                else (slot.count, slot.size, slot.size),
                initializer="zeros",
                dtype=self.statistics_dtype or slot.dtype,
                name=self.slot_variable_name(slot, "statistics"),
            )
            for slot in self._layout.slots
        ]
        counter = dict(shape=(), initializer="zeros", aggregation="only_first_replica")
        self._root_failures = self.add_variable(
            dtype="int64", name="root_failures", **counter
        )
        self._refreshes = self.add_variable(dtype="int64", name="refreshes", **counter)
        self._root_refresh = refresh.RootRefresh(self)

    def slot_variable_name(self, slot, what):
        """`g<group>_<block shape>_<what>_a<axis>`: the stacked state of one
        axis of one group of equal blocks."""
        shape = "x".join(str(d) for d in self._layout.groups[slot.group].shape)
        return f"g{slot.group}_{shape}_{what}_a{slot.axis}"

    def add_part_variables(self, what, kind=None):
        """Zero-initialised elementwise state (such as momentum): a variable
        per part of the layout, or per part of `kind` (None elsewhere)."""
        add = self.add_variable
        return [
            add(p.shape, initializer="zeros", dtype=p.dtype, name=f"{p.tag}_{what}")
            if kind in (None, p.kind)
            else None
            for p in self._layout.parts
        ]

    @property
    def refresh_waits(self):
        """Refreshes whose roots were not ready at their install step, so
        that the step waited for them or computed them itself (a variable;
        always 0 for refreshes in the step). Like `refresh_seconds` it
        depends on the machine's speed, so it is not saved."""
        return self._root_refresh.waits

    def step_number(self):
        """The step being taken, counted from 1, as int32."""
        # int32: modular arithmetic on int64 is not available on TPU.
        return tf.cast(self.iterations, tf.int32) + 1

    # A refresh in the step after the update: roots never meet the gradient
    # that completed their statistics (SOAP); before it, they do (Shampoo).
    refresh_after_update = False

    @property
    def refreshes_after_update(self):
        """Whether this optimizer's refreshes run in the step, after its
        update (pipelined ones install before it)."""
        return self.refresh_after_update and not self.refresh_delay_steps

    @property
    def first_preconditioned_step(self):
        """The first step whose update uses refreshed roots (bases): the
        start step plus the delay (1 for a refresh after the update)."""
        delay = 1 if self.refreshes_after_update else self.refresh_delay_steps
        return self.start_step + delay

    @property
    def refresh_delay_steps(self):
        """Steps between a refresh's statistics and their roots' first use:
        0 for refreshes in the step."""
        if self.root_refresh == "in_step" or self.communication.local_sgd:
            return 0
        if self.refresh_delay is not None:
            return self.refresh_delay
        return max(1, min(self.default_refresh_delay, self.precondition_frequency))

    # Steps a pipelined refresh has to compute its roots by default.
    default_refresh_delay = 10

    def advance_root_pipeline(self, next_steps=1, resync=False):
        """With pipelined refreshes, call between the steps of a custom
        training loop (`strategy.run` or `apply_gradients`), before a call
        that runs `next_steps` steps: it starts the host's computation of
        the roots after a refresh step, waits for late ones when the step
        that uses them is among the next `next_steps`, and installs them
        right before that step (in one process with one step per call;
        otherwise it hands them to that step, which installs them). Keep
        `next_steps` as on the first call (a change from 1 is a ValueError).
        `fit` calls it itself. Without it the install step computes the
        roots (counted in `refresh_waits`); once called, a step traced later
        leaves that out of its graph and keeps the old roots where a call
        was skipped: call it before every step, or never.

        It reads the step counter (which waits for the running step on an
        accelerator) only where a refresh can be due, counting the steps
        run since in Python; after restoring a checkpoint into this
        optimizer mid-run, pass `resync=True` once. A skipped call or a
        `next_steps` below the steps a call runs can make it read too late:
        the install step then keeps the old roots (counted in
        `refresh_waits`). Returns whether it waited."""
        validation.integer("next_steps", next_steps, 1)
        if not self.built:
            # Called before the first step builds the optimizer: that step
            # is traced knowing a driver runs between steps.
            self._root_pipeline_driven = True
            self._root_pipeline_span = getattr(self, "_root_pipeline_span", next_steps)
            return False
        host = self._root_refresh.host
        if host is None:
            return False
        if resync:
            host.resync()
        return host.advance(next_steps)

    # -- the update of all variables (cross-replica context) ---------------

    def update_variables(self, strategy, grads_and_vars, learning_rate):
        """Statistics, then (on refresh steps) the refresh, then every
        variable (the refresh last where `refresh_after_update`).

        The per-step work runs once per replica inside `extended.update`
        (where mirrored variables read and assign that replica's copy), for
        all variables together: a subclass decides once for all of them, and
        the blocks of one shape from every variable form one stack.
        """
        number = self.step_number()
        grads = [g for g, _ in grads_and_vars]
        variables = [v for _, v in grads_and_vars]
        anchor = variables[0]
        if isinstance(anchor, keras.Variable):
            anchor = anchor.value

        def on_each_replica(fn):
            strategy.extended.update(
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
        after = self.refreshes_after_update
        if not after:
            self._root_refresh.in_step(strategy, number)
        on_each_replica(lambda own: self.update_all(own, variables, learning_rate))
        if after:
            self._root_refresh.in_step(strategy, number)

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
        for slot, value in updated.items():
            if self.packed_statistics:
                value = pack_symmetric(value)
            self.assign(self._statistics[slot], value)

    def statistic(self, slot):
        """Slot `slot`'s statistics as [rows, n, n] in their storage dtype."""
        return unpack(self._layout, slot, self._statistics[slot])

    # -- the refresh (run by `self._root_refresh`) ------------------------

    def refresh_specs(self, slot, rows):
        """((shape, dtype), ...) of what `refresh` returns for `rows` rows
        of slot `slot`."""
        raise NotImplementedError

    def stored_dtypes(self, slot):
        """The dtypes the refreshed tensors of slot `slot` are stored in
        (casting to them once is all storing does); by default those of
        `refresh_specs`."""
        return tuple(dtype for _, dtype in self.refresh_specs(slot, 1))

    def current_refreshed(self, slot):
        """The tensors a refresh of slot `slot` replaces, as they are now
        (a tuple, as `refresh` returns)."""
        raise NotImplementedError

    def unchanged_refreshed(self, slot, begin, end):
        """What `refresh` returns for rows [begin, end) of slot `slot` when
        nothing changes: by default their current tensors."""
        specs = self.refresh_specs(slot, end - begin)
        return tuple(
            tf.cast(t[begin:end], dtype)
            for t, (_, dtype) in zip(self.current_refreshed(slot), specs)
        )

    def refresh(self, items, statistic, current, refresh_step):
        """(dict item -> tuple of tensors, dict item -> [rows] bool rejected)
        for items (slot, begin, end): rows [begin, end) of a slot, from
        `statistic(slot)` ([rows, n, n]) and the slot's current tensors
        `current(slot)`; `refresh_step` is the step whose statistics these
        are. A rejected row's tensors must equal its current ones. Pure:
        reads no variable, so it may run off the training step."""
        raise NotImplementedError

    def store_refreshed(self, results, refresh_step):
        """Assigns the refreshed tensors ({slot: tuple of tensors}) computed
        from the statistics of step `refresh_step`."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # A config saved before `precondition_1d` existed meant vectors were
        # preconditioned; keep that, so its saved state fits the layout.
        config = {"precondition_1d": True, **config}
        return super().from_config(config, custom_objects=custom_objects)

    def get_config(self):
        config = super().get_config()
        config.update(
            {name: getattr(self, name) for name in preconditioning_options.NAMES}
        )
        return config


def _plain_python(fn):
    # `extended.update` runs its function through AutoGraph inside a
    # `tf.function`; this code has no tensor-dependent Python control flow
    # (every branch is an explicit `tf.cond`), and converting it (a few
    # hundred functions) was most of Shampoo's first-step tracing time.
    return tf.autograph.experimental.do_not_convert(fn)
