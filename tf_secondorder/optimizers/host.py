"""Roots computed on the host, pipelined with the training steps.

Anil et al. (2020) compute Shampoo's inverse roots on the host's CPUs while
the accelerators train, and install them some steps later; the roots are a
little stale, which small-batch training tolerates. Here the training step
snapshots the statistics at refresh step t and installs the roots at step
t + d (`refresh.RootRefresh`); between steps, on the host's main thread,
`HostRefresh.advance` starts the computation from the snapshot (a CPU-placed
`tf.function` run by a background thread), moves finished roots into the
pending variables the step installs from, and before a call that will run
step t + d waits for them if they are late (counted in `refresh_waits`).

Who installs them at step t + d depends on the strategy. In one process
(no strategy, OneDeviceStrategy, MirroredStrategy) and one step per call,
the driver itself assigns the roots right before step t + d: every replica
gets the same values, and the training step holds no install code at all
(its graph, and so its first step, is smaller). Across workers
(MultiWorkerMirroredStrategy) the step installs them, taking each share of
the roots from one worker's host and all-gathering, so that every worker
installs the same bits even where their CPUs would round differently; so it
does on TPU and with several steps per call (`steps_per_execution`), where
step t + d runs inside a call.

All variable reads and writes happen on the main thread between steps (the
thread only computes from tensors it was given), so they never race with a
step or a checkpoint. On TPU the same design keeps the roots' eigh on the
host: the TPU step only copies the snapshot and installs.
"""

import concurrent.futures
import logging
import time

import tensorflow as tf

from tf_secondorder.optimizers.tensors import read

logger = logging.getLogger("tf_secondorder")


class HostRefresh:
    """The host side of a pipelined refresh. Built with the optimizer."""

    def __init__(self, root_refresh):
        self.root_refresh = root_refresh
        optimizer = root_refresh.optimizer
        self.optimizer = optimizer
        slots = root_refresh.layout.slots
        # What the host computed and the step installs, in the dtypes the
        # optimizer stores them in (bfloat16 roots stay bfloat16); not
        # tracked (a plain list of tf.Variables), so not saved: a resumed
        # run recomputes them from the saved snapshot.
        self._specs = [
            optimizer.refresh_specs(s, slot.count) for s, slot in enumerate(slots)
        ]
        self._pending = [
            tuple(
                tf.Variable(tf.zeros(shape, stored), trainable=False)
                for (shape, _), stored in zip(specs, optimizer.stored_dtypes(s))
            )
            for s, specs in enumerate(self._specs)
        ]
        self._rejected = [
            tf.Variable(tf.zeros([slot.count], tf.int64), trainable=False)
            for slot in slots
        ]
        # The refresh step whose roots `_pending` holds (0: none).
        self._ready_step = tf.Variable(0, dtype=tf.int32, trainable=False)
        self._executor = None
        # Whether something drives the pipeline between steps (then a step
        # traced afterwards need not be able to compute roots itself), and
        # how many steps each call of the training step runs (the driver's
        # first `next_steps`; None until it is called).
        self.driven = getattr(optimizer, "_root_pipeline_driven", False)
        self.span = getattr(optimizer, "_root_pipeline_span", None)
        # One process holds every replica: the driver can assign the roots.
        self._strategy = tf.distribute.get_strategy()
        self._one_process = not tf.distribute.has_strategy() or isinstance(
            self._strategy,
            (tf.distribute.MirroredStrategy, tf.distribute.OneDeviceStrategy),
        )
        self._job = None  # (refresh step, future)
        # Reading `iterations` or the pending refresh step copies them from
        # the device and so waits for the running step: on an accelerator
        # one such read per step would stop the host from queueing the next
        # step ahead. The driver keeps in Python an upper bound on the steps
        # done (the last value read plus each call's `next_steps`) and reads
        # only when a snapshot or an install can be due by that bound.
        self._steps_bound = None  # None: read at the next call
        self._call_steps = 0
        self._next_snapshot = 0
        # The refresh step whose roots were handed to the step (the value
        # `_ready_step` holds, known here without reading it).
        self._finished_step = 0
        self.counter_reads = 0
        self._function = None
        self._installer_function = None

    @property
    def installs(self):
        """Whether the driver installs the roots between steps (else the
        step at t + d does)."""
        return self.driven and self._one_process and self.span == 1

    # -- read by the step --------------------------------------------------------

    def ready(self, refresh_step):
        return tf.equal(read(self._ready_step), refresh_step)

    def pending_bytes(self):
        """Memory of the pending results (not part of the saved state)."""
        return sum(
            v.shape.num_elements() * v.dtype.size
            for v in [*[p for ps in self._pending for p in ps], *self._rejected]
        )

    def pending(self, items):
        """({item: tuple of tensors}, failures) of items (slot, begin, end)
        from the pending variables."""
        results, failures = {}, tf.constant(0, tf.int64)
        for slot, begin, end in items:
            whole = begin == 0 and end == self.root_refresh.layout.slots[slot].count
            # Back in the computed dtype (exact), as a step's refresh returns.
            results[(slot, begin, end)] = tuple(
                tf.cast(read(v) if whole else read(v)[begin:end], dtype)
                for v, (_, dtype) in zip(self._pending[slot], self._specs[slot])
            )
            failures += tf.reduce_sum(read(self._rejected[slot])[begin:end])
        return results, failures

    # -- between steps (main thread) -------------------------------------------

    def advance(self, next_steps=1):
        """Starts, collects or waits for the pending refresh so that the
        next `next_steps` steps find it ready. Returns whether it waited."""
        self.driven = True
        if self.span is None:
            self.span = next_steps
        elif self.installs and next_steps != 1:
            raise ValueError(
                "`next_steps` must stay 1 once the training step has been "
                "traced for single steps (the roots are installed between "
                f"steps); received {next_steps}"
            )
        if self._steps_bound is not None:
            self._steps_bound += self._call_steps
        self._call_steps = next_steps
        if self._function is None and self._steps_bound:
            # After the first step, whose tracing it would slow (the GIL).
            self._prepare()
        if self._steps_bound is not None and not self._may_be_due(next_steps):
            return False
        done_steps, refresh_step = self._read_counters()
        if self._function is None and done_steps > 0:
            self._prepare()
        if refresh_step in (0, self._finished_step):
            if refresh_step == 0:  # installed, or missed and dropped
                self._job = None
            self._next_snapshot = self._due_after(done_steps)
            return False
        self._next_snapshot = self._due_after(max(done_steps, refresh_step))
        if self._job is None or self._job[0] != refresh_step:
            self._start(refresh_step)
        _, future = self._job
        install = refresh_step + self.root_refresh.delay
        waited = False
        if not future.done():
            if done_steps + next_steps < install:
                return False
            waited = True
            started = time.perf_counter()
            future.result()
            logger.debug(
                "tf_secondorder: waited %.3f s for the roots of step %d",
                time.perf_counter() - started,
                refresh_step,
            )
        if waited:
            self.root_refresh.waits.assign_add(1)
        if not self.installs:
            self._collect(refresh_step, future.result())
        elif done_steps + 1 == install:
            self._install(refresh_step, future.result())
            self._job = None
        return waited

    def resync(self):
        """Forgets what the driver knows of the step counter, so that its
        next call reads it (after a checkpoint is restored into a running
        optimizer)."""
        self._steps_bound = None

    def _may_be_due(self, next_steps):
        """Whether, with at most `_steps_bound` steps done, a snapshot may
        be waiting for the host or the pending roots may be needed (or
        collectable) within the next `next_steps` steps. Decided from the
        bound alone: the counters are read only when this holds."""
        if self._job is not None and self._job[0] != self._finished_step:
            refresh_step, future = self._job
            install = refresh_step + self.root_refresh.delay
            if not self.installs and future.done():
                return True  # hand the roots over now
            return self._steps_bound + next_steps >= install
        return self._steps_bound >= self._next_snapshot

    def _read_counters(self):
        """(steps done, pending refresh step): a copy from the device that
        waits for the running step, so done only where `_may_be_due`."""
        self.counter_reads += 1
        done_steps = int(self.optimizer.iterations.numpy())
        self._steps_bound = done_steps
        return done_steps, int(self.root_refresh.snapshot_step.numpy())

    def _due_after(self, steps):
        """The first refresh step after `steps` done steps."""
        start, frequency = self.root_refresh.start, self.root_refresh.frequency
        if steps < start:
            return start
        return start + ((steps - start) // frequency + 1) * frequency

    def _prepare(self):
        """The thread and its function, traced there at once (from the
        shapes alone), so that the first refresh does not wait for it."""
        # Plain Python (no tensor-dependent control flow): no AutoGraph.
        self._function = tf.function(self._compute, autograph=False)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tf_secondorder_roots"
        )
        slots = range(len(self.root_refresh.layout.slots))
        specs = (
            [
                tf.TensorSpec(v.shape, v.dtype)
                for v in (self.root_refresh.snapshot_statistic(s) for s in slots)
            ],
            [
                tuple(tf.TensorSpec(t.shape, t.dtype) for t in current)
                for current in (self.optimizer.current_refreshed(s) for s in slots)
            ],
            tf.TensorSpec([], tf.int32),
        )

        def trace():
            with tf.device("/CPU:0"):
                self._function.get_concrete_function(*specs)
            if self.installs:
                self._installer()

        self._executor.submit(trace)

    def _start(self, refresh_step):
        optimizer = self.optimizer
        slots = range(len(self.root_refresh.layout.slots))
        # Read on this thread: the background thread touches no variable.
        statistics = [self.root_refresh.snapshot_statistic(s) for s in slots]
        current = [optimizer.current_refreshed(s) for s in slots]
        step = tf.constant(refresh_step, tf.int32)

        def run():
            started = time.perf_counter()
            with tf.device("/CPU:0"):
                out = self._function(statistics, current, step)
            # Eager CPU results are computed when the call returns; kept as
            # tensors, so that installing them copies nothing more.
            return out, time.perf_counter() - started

        self._job = (refresh_step, self._executor.submit(run))

    def _compute(self, statistics, current, refresh_step):
        items = self.root_refresh.all_items()
        results, rejected = self.optimizer.refresh(
            items, lambda s: statistics[s], lambda s: tuple(current[s]), refresh_step
        )
        return [(results[item], tf.cast(rejected[item], tf.int64)) for item in items]

    def _result_specs(self):
        return [
            (
                tuple(tf.TensorSpec(shape, dtype) for shape, dtype in specs),
                tf.TensorSpec([slot.count], tf.int64),
            )
            for specs, slot in zip(self._specs, self.root_refresh.layout.slots)
        ]

    def _installer(self):
        """The concrete function storing a refresh's results, traced once
        (on the host's thread, ahead of the first install) under the
        strategy whose replicas it writes; its arguments are the flat
        results (each slot's tensors, then its rejected flags) and the
        refresh step."""
        if self._installer_function is None:
            root_refresh = self.root_refresh
            counts = [len(specs) for specs in self._specs]

            def install(flat, refresh_step):
                results, failures, i = {}, [], 0
                for slot, count in enumerate(counts):
                    results[slot] = tuple(flat[i : i + count])
                    failures.append(tf.reduce_sum(flat[i + count]))
                    i += count + 1
                root_refresh.store(results, tf.add_n(failures), refresh_step)
                root_refresh.snapshot_step.assign(0)

            specs = [
                spec
                for values, rejected in self._result_specs()
                for spec in (*values, rejected)
            ]
            with self._strategy.scope():
                self._installer_function = tf.function(
                    install, autograph=False
                ).get_concrete_function(specs, tf.TensorSpec([], tf.int32))
        return self._installer_function

    def _install(self, refresh_step, outcome):
        """The roots of step `refresh_step` into the optimizer's variables,
        right before the step that uses them first (every replica alike)."""
        tensors, seconds = outcome
        flat = [t for values, rejected in tensors for t in (*values, rejected)]
        with self._strategy.scope():
            self._installer()(flat, tf.constant(refresh_step, tf.int32))
        self.root_refresh.clock.seconds.assign_add(seconds)

    def _collect(self, refresh_step, outcome):
        (tensors, seconds) = outcome
        for slot, (values, rejected) in enumerate(tensors):
            for variable, value in zip(self._pending[slot], values):
                variable.assign(tf.cast(value, variable.dtype))
            self._rejected[slot].assign(rejected)
        self._ready_step.assign(refresh_step)
        self._finished_step = refresh_step
        self.root_refresh.clock.seconds.assign_add(seconds)
