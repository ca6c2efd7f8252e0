"""Trains one optimizer on one task with model.fit and records loss and timing."""

import contextlib
import time

import keras
import numpy as np

import tf_secondorder as tfso
from tf_secondorder.bench.optimizers import make_optimizer
from tf_secondorder.compat import replica_state


class _Recorder(keras.callbacks.Callback):
    """Per-step wall times (training only) and the task loss every eval_every steps."""

    def __init__(self, task, averaging=None):
        super().__init__()
        self.task = task
        # With an IterateAveraging callback each evaluation also scores the
        # mean of the iterates (the same run, so the two curves differ only
        # by the averaging).
        self.averaging = averaging
        self.averaged_curve = []
        self.step_times = []
        self.curve = []
        self.train_seconds = 0.0

    # A step's time runs from the end of the previous step (or of the last
    # evaluation) to its own end, so it includes the other callbacks' work
    # before it: a pipelined refresh waits for late roots in one.
    def on_train_begin(self, logs=None):
        self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._last
        self.step_times.append(elapsed)
        self.train_seconds += elapsed
        step = len(self.step_times)
        if step % self.task.eval_every == 0:
            self.curve.append([step, self._evaluate(), self.train_seconds])
            if self.averaging is not None:
                with self.averaging.applied():
                    self.averaged_curve.append([step, self._evaluate()])
        self._last = time.perf_counter()

    def _evaluate(self):
        optimizer = self.model.optimizer
        if not getattr(optimizer, "replicas_differ", lambda: False)():
            return self.task.evaluate(self.model)
        return evaluate_as_if_stopped(self.model, optimizer, self.task.evaluate)


def evaluate_as_if_stopped(model, optimizer, evaluate):
    """`evaluate(model)` on the model a user would get by stopping now, without
    changing the run: under local SGD the replicas' weights differ between
    averages, so every replica's state (model, optimizer, outer optimizer,
    byte counters; the outer optimizer's are among the optimizer's) is kept,
    averaged as at the end of `fit` (with DiLoCo an outer step), evaluated,
    and put back. Measuring the curve then neither adds rounds nor bytes to
    the run, nor makes its replicas meet more often than its schedule says."""
    variables = [*model.variables, *optimizer.variables]
    kept = [replica_state.replica_values(v) for v in variables]
    try:
        optimizer.average_replicas()
        return evaluate(model)
    finally:
        for v, values in zip(variables, kept):
            replica_state.assign_replica_values(v, values)


def variable_bytes(variables):
    """Bytes of `variables` (one replica's copy of each)."""
    import tensorflow as tf

    total = 0
    for v in variables:
        total += int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
    return total


def run(
    task,
    optimizer_name,
    learning_rate,
    options=None,
    seed=0,
    verbose=1,
    strategy=None,
    repeat=0,
    precision="float32",
    average_from=None,
    jit_compile=False,
):
    """Trains `optimizer_name` at `learning_rate` on `task`; returns its record.

    With `average_from` (a step) the run also keeps the mean of the iterates
    from that step (`tfso.callbacks.IterateAveraging`) and scores it at every
    evaluation: the record's "averaged_curve" and "averaged_final_loss".

    `precision` is the Keras dtype policy the model is built under (set for
    this run only); under `"mixed_float16"` `compile` wraps the optimizer in
    Keras's LossScaleOptimizer. `jit_compile` compiles the model with
    `jit_compile=True` (one device).

    The record holds the task-loss curve, step times (median, mean, first),
    optimizer-state bytes and, for Shampoo and SOAP, refresh cost and root
    failures. `repeat` is stored with it (see `report.aggregate`).
    """
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with dtype_policy(precision), scope:
        model = task.make_model(seed)
        optimizer = make_optimizer(
            optimizer_name, learning_rate, options, wrap=replicas > 1
        )
        # Without a strategy Keras builds the optimizer inside the first trace
        # of the train step, and creating variables there makes TensorFlow
        # trace it twice; building first (for every optimizer alike) avoids it.
        optimizer.build(model.trainable_variables)
        model.compile(optimizer=optimizer, loss=task.loss, jit_compile=jit_compile)
    averaging = (
        None
        if average_from is None
        else tfso.callbacks.IterateAveraging(
            start_step=average_from, evaluate_with_average=False, apply_at_end=False
        )
    )
    recorder = _Recorder(task, averaging)
    # One epoch: an epoch's end averages local-SGD replicas (SyncReplicas),
    # which would add rounds to the run that its schedule does not have.
    model.fit(
        task.make_dataset(seed),
        steps_per_epoch=task.eval_every * (task.steps // task.eval_every),
        epochs=1,
        callbacks=[recorder] if averaging is None else [averaging, recorder],
        verbose=verbose,
        shuffle=False,  # the dataset shuffles itself
    )
    times = np.array(recorder.step_times)
    later = times[1:] if len(times) > 1 else times
    state_bytes = variable_bytes(optimizer.variables)
    weight_bytes = variable_bytes(model.trainable_variables)
    result = {
        "optimizer": optimizer_name,
        "learning_rate": learning_rate,
        "replicas": replicas,
        "precision": precision,
        "jit_compile": jit_compile,
        "repeat": repeat,
        "seed": seed,
        "options": dict(options or {}),
        "curve": [[s, loss] for s, loss, _ in recorder.curve],
        "curve_seconds": [t for _, _, t in recorder.curve],
        "final_loss": recorder.curve[-1][1],
        # Step 1 traces the graph; leave it out of the timing statistics.
        "median_step_seconds": float(np.median(later)),
        # Mean over all later steps: root refreshes amortised in.
        "mean_step_seconds": float(np.mean(later)),
        # Tracing and compiling the train step (and the first refresh's
        # kernels): paid once per run.
        "first_step_seconds": float(times[0]),
        # Optimizer variables (moments, statistics, roots, counters) against
        # the model's trainable weights, in bytes.
        "state_bytes": state_bytes,
        "weight_bytes": weight_bytes,
        "state_memory_ratio": state_bytes / weight_bytes if weight_bytes else None,
    }
    if averaging is not None:
        result["average_from"] = average_from
        result["averaged_curve"] = recorder.averaged_curve
        result["averaged_final_loss"] = recorder.averaged_curve[-1][1]
    if hasattr(optimizer, "communication_stats") and replicas > 1:
        stats = optimizer.communication_stats()
        # The last step's bytes, and every byte of the run (warm-ups,
        # full-precision steps and averages included) against a float32
        # all-reduce at every step.
        result["bytes_per_step"] = stats["bytes_per_step"]
        result["float32_bytes_per_step"] = stats["float32_bytes_per_step"]
        result["bytes_total"] = stats["bytes_total"]
        result["rounds"] = stats["rounds"]
        result["run_bytes_ratio"] = stats["bytes_total"] / (
            len(times) * stats["float32_bytes_per_step"]
        )
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        result["loss_scale"] = float(model.optimizer.dynamic_scale.numpy())
    if isinstance(optimizer, (tfso.Shampoo, tfso.SOAP)):
        refresh = [
            s
            for s in range(2, len(times) + 1)
            if s >= optimizer.start_step
            and (s - optimizer.start_step) % optimizer.precondition_frequency == 0
        ]
        # Pipelined: the refresh step only snapshots; the roots are installed
        # d steps later, after the host's computation (or a wait for it).
        delay = optimizer.refresh_delay_steps
        installs = [s + delay for s in refresh if delay and s + delay <= len(times)]
        special = sorted(set(refresh + installs))
        ordinary = np.delete(times, [s - 1 for s in special] + [0])
        if len(ordinary):
            result["median_step_seconds"] = float(np.median(ordinary))
        # Refresh and install steps also update the statistics when the
        # ordinary steps around them do only every `statistics_frequency`
        # steps: each is compared with the ordinary steps of its own kind,
        # so that the ratio is the refresh's cost alone.
        frequency = optimizer.statistics_frequency
        start = optimizer.start_step

        def with_statistics(s):
            return s <= start or s % frequency == 0

        special_set = set(special) | {1}
        same_kind = {
            kind: [
                times[s - 1]
                for s in range(1, len(times) + 1)
                if s not in special_set and with_statistics(s) == kind
            ]
            for kind in (True, False)
        }
        costs = []
        for steps in (refresh, installs):
            if not steps:
                continue
            kind = with_statistics(steps[0])
            baseline = same_kind[kind] or list(ordinary)
            costs.append(
                (
                    float(np.median(times[[s - 1 for s in steps]])),
                    float(np.median(baseline)),
                )
            )
        if costs:
            # The costlier of the two kinds of step, and the median of the
            # ordinary steps of its kind.
            cost, baseline = max(costs, key=lambda c: c[0] / c[1])
            result["refresh_step_seconds"] = cost
            result["refresh_baseline_seconds"] = baseline
        result["refresh_seconds"] = float(optimizer.refresh_seconds.numpy())
        result["refresh_waits"] = int(optimizer.refresh_waits.numpy())
        result["root_failures"] = int(optimizer.root_failures.numpy())
    return result


@contextlib.contextmanager
def dtype_policy(name):
    """Keras's global dtype policy `name` inside the block, the previous
    one after: layers keep the policy they were built under."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
