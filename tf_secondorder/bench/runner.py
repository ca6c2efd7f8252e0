"""Trains one optimizer on one task with model.fit and records loss and timing."""

import time

import keras
import numpy as np

import tf_secondorder as tfso

# Shampoo settings used by the benchmark unless overridden on the command line
# (chosen on T1, see docs/benchmarks.md; the library defaults follow the spec).
BENCH_SHAMPOO = dict(
    precondition_frequency=100, block_size=256, statistics_frequency=5, epsilon=1e-6
)


# SOAP: the authors' defaults (betas 0.95, refresh every 10 steps) with
# Shampoo's benchmark block size.
BENCH_SOAP = dict(precondition_frequency=10, block_size=256)
BENCH_OPTIONS = {"shampoo": BENCH_SHAMPOO, "soap": BENCH_SOAP}


def make_optimizer(name, learning_rate, options=None):
    options = dict(options or {})
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, **options)
    if name == "shampoo":
        return tfso.Shampoo(learning_rate, **{**BENCH_SHAMPOO, **options})
    if name == "soap":
        return tfso.SOAP(learning_rate, **{**BENCH_SOAP, **options})
    raise ValueError(
        f"`optimizers` entries must be 'adam', 'shampoo' or 'soap'. Received: {name!r}"
    )


class _Recorder(keras.callbacks.Callback):
    """Per-step wall times (training only) and the task loss every eval_every steps."""

    def __init__(self, task):
        super().__init__()
        self.task = task
        self.step_times = []
        self.curve = []
        self.train_seconds = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._start
        self.step_times.append(elapsed)
        self.train_seconds += elapsed
        step = len(self.step_times)
        if step % self.task.eval_every == 0:
            self.curve.append(
                [step, self.task.evaluate(self.model), self.train_seconds]
            )


def run(task, optimizer_name, learning_rate, options=None, seed=0, verbose=1):
    model = task.make_model(seed)
    optimizer = make_optimizer(optimizer_name, learning_rate, options)
    # Without a strategy Keras builds the optimizer inside the first trace of
    # the train step, and creating variables there makes TensorFlow trace it
    # twice; building first (for every optimizer alike) avoids the retrace.
    optimizer.build(model.trainable_variables)
    model.compile(optimizer=optimizer, loss=task.loss)
    recorder = _Recorder(task)
    model.fit(
        task.make_dataset(seed),
        steps_per_epoch=task.eval_every,
        epochs=task.steps // task.eval_every,
        callbacks=[recorder],
        verbose=verbose,
    )
    times = np.array(recorder.step_times)
    result = {
        "optimizer": optimizer_name,
        "learning_rate": learning_rate,
        "options": dict(BENCH_OPTIONS.get(optimizer_name, {}), **(options or {})),
        "curve": [[s, loss] for s, loss, _ in recorder.curve],
        "curve_seconds": [t for _, _, t in recorder.curve],
        "final_loss": recorder.curve[-1][1],
        # Step 1 traces the graph; leave it out of the timing statistics.
        "median_step_seconds": float(np.median(times[1:])),
        # Mean over all later steps: root refreshes amortised in.
        "mean_step_seconds": float(np.mean(times[1:])),
        # Tracing (and the first refresh's kernels): paid once per run.
        "first_step_seconds": float(times[0]),
    }
    if isinstance(optimizer, (tfso.Shampoo, tfso.SOAP)):
        refresh = [
            s
            for s in range(2, len(times) + 1)
            if s >= optimizer.start_step
            and (s - optimizer.start_step) % optimizer.precondition_frequency == 0
        ]
        ordinary = np.delete(times, [s - 1 for s in refresh] + [0])
        result["median_step_seconds"] = float(np.median(ordinary))
        if refresh:
            result["refresh_step_seconds"] = float(
                np.median(times[[s - 1 for s in refresh]])
            )
        result["root_failures"] = int(optimizer.root_failures.numpy())
    return result


def steps_and_seconds_to(result, target):
    """First evaluated step (and training seconds) at which loss <= target."""
    for (step, loss), seconds in zip(
        result["curve"], result["curve_seconds"], strict=True
    ):
        if loss <= target:
            return step, seconds
    return None, None


def summarize(task, results, baseline="adam"):
    """Adds target, steps/time-to-target and ratios to the baseline in place."""
    base_runs = [r for r in results if r["optimizer"] == baseline]
    pool = base_runs or results
    best_base = min(pool, key=lambda r: r["final_loss"])
    target = best_base["final_loss"]
    base_steps, base_seconds = steps_and_seconds_to(best_base, target)
    for r in results:
        steps, seconds = steps_and_seconds_to(r, target)
        r["steps_to_target"] = steps
        r["seconds_to_target"] = seconds
        r["step_time_ratio"] = (
            r["median_step_seconds"] / best_base["median_step_seconds"]
        )
        r["amortized_step_time_ratio"] = (
            r["mean_step_seconds"] / best_base["mean_step_seconds"]
        )
        r["steps_ratio"] = steps / base_steps if steps else None
        r["time_ratio"] = seconds / base_seconds if seconds else None
        if "refresh_step_seconds" in r:
            r["refresh_cost"] = r["refresh_step_seconds"] / r["median_step_seconds"]
    return {
        "task": task.name,
        "target": target,
        "baseline": baseline,
        "baseline_lr": best_base["learning_rate"],
    }


def format_table(summary, results):
    head = (
        f"task {summary['task']}: target {summary['target']:.5f} "
        f"(best {summary['baseline']}, lr {summary['baseline_lr']:g})"
    )
    lines = [
        head,
        "optimizer   lr       final     steps->tgt  steps x  step-time x  "
        "(amortised)  time->tgt x  refresh x",
    ]

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    for r in results:
        lines.append(
            f"{r['optimizer']:<11} {r['learning_rate']:<8g} {r['final_loss']:<9.5f} "
            f"{fmt(r['steps_to_target'], 'd'):>10}  {fmt(r['steps_ratio'], '.2f'):>7}  "
            f"{r['step_time_ratio']:>11.2f}  {r['amortized_step_time_ratio']:>11.2f}  "
            f"{fmt(r['time_ratio'], '.2f'):>11}  "
            f"{fmt(r.get('refresh_cost'), '.1f'):>9}"
        )
    return "\n".join(lines)
