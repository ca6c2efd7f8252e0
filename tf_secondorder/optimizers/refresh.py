"""When and where Shampoo's roots (SOAP's bases) are refreshed.

`RootRefresh` owns both decisions for one optimizer:

- *when*: at refresh step t (every `precondition_frequency` steps from the
  start step) the new roots are either computed and installed in that step
  (`root_refresh="in_step"`), or *pipelined*: the step snapshots the
  statistics, the host computes the roots while training goes on with the
  previous ones (`host.HostRefresh`), and step t + d uses them: in one
  process with one step per call the host's driver installs them right
  before that step (the step then holds no install code), otherwise that
  step installs them. The
  install step is fixed by the step number alone, so every replica and
  worker installs the same roots at the same step; a root that is not ready
  then is waited for (from `fit`, or a custom loop's call of
  `advance_root_pipeline`) or, where nothing waited, computed by the step
  itself from the snapshot: either way the result is the roots of step t's
  statistics, counted in `refresh_waits`. (A step traced after a driver ran
  leaves that computation out of its graph, for a shorter first step.)
- *where* a refresh that runs in a step is computed (`compute`): by every
  replica from its own statistics under local SGD; split across replicas
  and all-gathered under MirroredStrategy / MultiWorkerMirroredStrategy
  with `distribute_roots`; otherwise whole, where the step runs.

The snapshot and its step are saved with the optimizer, so a checkpoint taken
between snapshot and install resumes exactly: the roots are recomputed from
the saved snapshot. The host's results are not saved.
"""

import tensorflow as tf

from tf_secondorder.compat.graph import in_xla_context
from tf_secondorder.distribute import sharding
from tf_secondorder.optimizers.host import HostRefresh
from tf_secondorder.optimizers.tensors import no_op, read, unpack

ROOT_REFRESH = ("auto", "pipelined", "in_step")


class RootRefresh:
    """The refresh schedule and placement of one Shampoo / SOAP optimizer.

    Built in the optimizer's `build` (under its strategy's scope)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.layout = optimizer._layout
        self.start = optimizer.start_step
        self.frequency = optimizer.precondition_frequency
        self.delay = optimizer.refresh_delay_steps
        self.clock = _Clock()
        self.waits = self.clock.waits
        self.host = None
        if self.delay:
            # The snapshot of the statistics at the refresh step and that
            # step (0: none pending): saved, so a resumed run recomputes.
            self.snapshot = [
                optimizer.add_variable(
                    tuple(stat.shape),
                    initializer="zeros",
                    dtype=stat.dtype,
                    name=optimizer.slot_variable_name(slot, "snapshot"),
                )
                for slot, stat in zip(self.layout.slots, optimizer._statistics)
            ]
            self.snapshot_step = optimizer.add_variable(
                (),
                initializer="zeros",
                dtype="int32",
                name="snapshot_step",
                aggregation="only_first_replica",
            )
            self.host = HostRefresh(self)

    # -- in the step (cross-replica context) ---------------------------------

    def due(self, number):
        since_start = number - self.start
        return (since_start >= 0) & (since_start % self.frequency == 0)

    def in_step(self, strategy, number):
        """The step's refresh work; `number` is the 1-based step."""
        if not self.layout.slots:
            return
        if not self.delay:
            tf.cond(
                self.due(number),
                lambda: self._timed(
                    lambda: self._refresh_now(strategy, number), count=True
                ),
                no_op,
            )
            return
        pending = read(self.snapshot_step)
        install_due = (pending > 0) & tf.equal(number, pending + self.delay)
        if self.host.installs:
            # The driver installed the roots before this step and cleared
            # the pending step; if it is still set, a call was skipped: the
            # roots stay as they are, and the miss is counted.
            self.waits.assign_add(tf.cast(install_due, tf.int64))
            self.snapshot_step.assign(tf.where(install_due, 0, pending))
        else:
            tf.cond(install_due, lambda: self._install(strategy, pending), no_op)
        tf.cond(self.due(number), lambda: self._take_snapshot(number), no_op)

    def _refresh_now(self, strategy, number):
        results, failures = self.compute(strategy, self.optimizer.statistic, number)
        self.store(results, failures, number)
        return results  # for the clock to wait on (None under local SGD)

    def _take_snapshot(self, number):
        self.optimizer._refreshes.assign_add(1)
        for snapshot, statistics in zip(self.snapshot, self.optimizer._statistics):
            snapshot.assign(read(statistics))
        self.snapshot_step.assign(number)

    def _install(self, strategy, refresh_step):
        statistic = self.snapshot_statistic
        ready = self.host.ready(refresh_step)

        def from_host(items):
            return self.host.pending(items)

        def computed(items):
            # Nothing waited for the host: the step computes the same roots
            # from the same snapshot.
            return self._timed(
                lambda: counted(
                    self.optimizer.refresh(
                        items, statistic, self.optimizer.current_refreshed, refresh_step
                    )
                )
            )

        def kept(items):
            # A driver skipped its wait: the roots stay as they are.
            unchanged = self.optimizer.unchanged_refreshed
            return {item: unchanged(*item) for item in items}, tf.constant(0, tf.int64)

        # Traced after a driver (fit's callback, `advance_root_pipeline`) has
        # run, the step leaves the roots' computation out of its graph: the
        # driver waits for them, so they are ready. Traced before, the step
        # can compute them itself.
        late = kept if self.host.driven else computed

        def either(items):
            return tf.cond(ready, lambda: from_host(items), lambda: late(items))

        results, failures = self.compute(
            strategy, statistic, refresh_step, compute_items=either
        )
        self.waits.assign_add(tf.cast(~ready, tf.int64))
        self.store(results, failures, refresh_step)
        self.snapshot_step.assign(0)

    def snapshot_statistic(self, slot):
        return unpack(self.layout, slot, self.snapshot[slot])

    def _timed(self, fn, count=False):
        if count:
            self.optimizer._refreshes.assign_add(1)
        if in_xla_context():
            out = fn()
            return None if count else out
        # The computation reads its inputs after the first timestamp and
        # the second waits for its results: the roots are pure tensor work,
        # which automatic control dependencies would not order.
        start = tf.timestamp()
        with tf.control_dependencies([start]):
            out = fn()
        flat = [t for t in tf.nest.flatten(out) if isinstance(t, tf.Tensor)]
        with tf.control_dependencies(flat):
            self.clock.seconds.assign_add(tf.timestamp() - start)
        return None if count else out

    # -- where a refresh is computed ------------------------------------------

    def all_items(self):
        return [(s, 0, slot.count) for s, slot in enumerate(self.layout.slots)]

    def compute(self, strategy, statistic, refresh_step, compute_items=None):
        """({slot: tuple of tensors}, failures) of every slot, computed where
        this strategy computes refreshes. `compute_items(items)` computes a
        list of items; by default the optimizer's `refresh`."""
        optimizer = self.optimizer
        if compute_items is None:

            def compute_items(items):
                return counted(
                    optimizer.refresh(
                        items, statistic, optimizer.current_refreshed, refresh_step
                    )
                )

        items = self.all_items()
        if optimizer.communicator.averages_locally(strategy):
            # Local SGD: each replica refreshes from its own statistics.
            # Inside `extended.update` reads and assignments of mirrored
            # variables act on the replica being updated.
            def own_refresh(_):
                results, failures = compute_items(items)
                self.store(_by_slot(results), failures, refresh_step)

            strategy.extended.update(
                optimizer._statistics[0].value,
                tf.autograph.experimental.do_not_convert(own_refresh),
                group=False,
            )
            return None, None
        if not sharding.splits_work(strategy, optimizer.distribute_roots):
            results, failures = compute_items(items)
            return _by_slot(results), failures
        pieces = self.shards(strategy.num_replicas_in_sync)
        shares = sharding.greedy_partition(
            [
                sharding.root_cost(self.layout.slots[s].size) * (e - b)
                for s, b, e in pieces
            ],
            strategy.num_replicas_in_sync,
        )
        specs = {
            i: optimizer.refresh_specs(s, e - b) for i, (s, b, e) in enumerate(pieces)
        }

        def compute_share(indices):
            results, failures = compute_items([pieces[i] for i in indices])
            return {i: results[pieces[i]] for i in indices}, failures

        results, failures = sharding.run_sharded(strategy, shares, specs, compute_share)
        return _by_slot({pieces[i]: r for i, r in results.items()}), failures

    def shards(self, num_replicas):
        """Items (slot, begin, end) that cut every slot into at most
        `num_replicas` nearly equal row ranges, for `greedy_partition`."""
        pieces = []
        for s, slot in enumerate(self.layout.slots):
            parts = min(num_replicas, slot.count)
            bounds = [slot.count * k // parts for k in range(parts + 1)]
            pieces += [(s, bounds[k], bounds[k + 1]) for k in range(parts)]
        return pieces

    def store(self, results, failures, refresh_step):
        if results is None:  # stored per replica already
            return
        self.optimizer.store_refreshed(results, refresh_step)
        self.optimizer._root_failures.assign_add(tf.cast(failures, tf.int64))


def counted(refreshed):
    """(results, rejected per item) -> (results, total rejected as int64)."""
    results, rejected = refreshed
    total = tf.constant(0, tf.int64)
    for flags in rejected.values():
        total += tf.reduce_sum(tf.cast(flags, tf.int64))
    return results, total


def _by_slot(results):
    """{(slot, begin, end): tensors} -> {slot: tensors over all its rows}."""
    slots = {}
    for (slot, _, _), tensors in sorted(results.items()):
        slots.setdefault(slot, []).append(tensors)
    return {
        slot: tuple(
            parts[0][k] if len(parts) == 1 else tf.concat([p[k] for p in parts], 0)
            for k in range(len(parts[0]))
        )
        for slot, parts in slots.items()
    }


class _Clock:
    """Holds the timing counters (refresh seconds, waits for late roots) out
    of the optimizer's tracked state (a plain object: neither Keras nor
    tf.train.Checkpoint tracks it), so checkpoints, SavedModels and the
    replicas' state comparisons stay deterministic: these depend on the
    machine's speed, not on the training."""

    def __init__(self):
        self.seconds = tf.Variable(
            tf.constant(0.0, tf.float64), trainable=False, name="refresh_seconds"
        )
        self.waits = tf.Variable(
            tf.constant(0, tf.int64), trainable=False, name="refresh_waits"
        )
