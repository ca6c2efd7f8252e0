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


KERAS_OPTIMIZERS = {
    "adam": lambda lr, **o: keras.optimizers.Adam(lr, **o),
    "adamw": lambda lr, **o: keras.optimizers.AdamW(lr, **o),
    "sgd": lambda lr, **o: keras.optimizers.SGD(lr, **{"momentum": 0.9, **o}),
    "lion": lambda lr, **o: keras.optimizers.Lion(lr, **o),
    "muon": lambda lr, **o: keras.optimizers.Muon(lr, **o),
}
TFSO_OPTIMIZERS = {
    "shampoo": lambda lr, **o: tfso.Shampoo(lr, **{**BENCH_SHAMPOO, **o}),
    "soap": lambda lr, **o: tfso.SOAP(lr, **{**BENCH_SOAP, **o}),
    "signsgd": lambda lr, **o: tfso.SignSGD(lr, **{"momentum": 0.9, **o}),
}


def optimizer_names():
    """Every accepted name; any of them may end in "+COMPRESSOR"."""
    return sorted(KERAS_OPTIMIZERS) + sorted(TFSO_OPTIMIZERS)


def parse_name(name):
    """ "shampoo+sign" -> ("shampoo", {"compression": "sign"}), checked."""
    base, _, compression = name.partition("+")
    if base not in KERAS_OPTIMIZERS and base not in TFSO_OPTIMIZERS:
        raise ValueError(
            f"`optimizers` entries must be one of {optimizer_names()}, optionally "
            f"followed by +COMPRESSOR (e.g. shampoo+sign). Received: {name!r}"
        )
    if not compression:
        return base, {}
    if compression not in tfso.compression.names():
        raise ValueError(
            f"`optimizers` entry {name!r}: the compressor after '+' must be one of "
            f"{tfso.compression.names()}."
        )
    return base, {"compression": compression}


def make_optimizer(name, learning_rate, options=None, wrap=False):
    """The optimizer `name` (see `parse_name`); Keras optimizers go through
    `tfso.distributed` when compressed or when `wrap` (to count bytes)."""
    base, communication = parse_name(name)
    options = dict(options or {})
    if base in TFSO_OPTIMIZERS:
        return TFSO_OPTIMIZERS[base](learning_rate, **communication, **options)
    optimizer = KERAS_OPTIMIZERS[base](learning_rate, **options)
    if communication or wrap:
        optimizer = tfso.distributed(optimizer, **communication)
    return optimizer


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


def run(
    task, optimizer_name, learning_rate, options=None, seed=0, verbose=1, strategy=None
):
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    with strategy.scope() if strategy is not None else _no_scope():
        model = task.make_model(seed)
        optimizer = make_optimizer(
            optimizer_name, learning_rate, options, wrap=replicas > 1
        )
        # Without a strategy Keras builds the optimizer inside the first trace
        # of the train step, and creating variables there makes TensorFlow
        # trace it twice; building first (for every optimizer alike) avoids it.
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
    base = parse_name(optimizer_name)[0]
    result = {
        "optimizer": optimizer_name,
        "learning_rate": learning_rate,
        "replicas": replicas,
        "options": dict(BENCH_OPTIONS.get(base, {}), **(options or {})),
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
    if hasattr(optimizer, "communication_stats") and replicas > 1:
        stats = optimizer.communication_stats()
        result["bytes_per_step"] = stats["bytes_per_step"]
        result["float32_bytes_per_step"] = stats["float32_bytes_per_step"]
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


class _no_scope:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False


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
    width = max([11] + [len(r["optimizer"]) for r in results])
    with_bytes = any("bytes_per_step" in r for r in results)
    lines = [
        head,
        f"{'optimizer':<{width}} lr       final     steps->tgt  steps x  step-time x  "
        "(amortised)  time->tgt x  refresh x" + ("  bytes/step" if with_bytes else ""),
    ]

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    for r in results:
        lines.append(
            f"{r['optimizer']:<{width}} {r['learning_rate']:<8g} {r['final_loss']:<9.5f} "
            f"{fmt(r['steps_to_target'], 'd'):>10}  {fmt(r['steps_ratio'], '.2f'):>7}  "
            f"{r['step_time_ratio']:>11.2f}  {r['amortized_step_time_ratio']:>11.2f}  "
            f"{fmt(r['time_ratio'], '.2f'):>11}  "
            f"{fmt(r.get('refresh_cost'), '.1f'):>9}"
            + (f"  {fmt(r.get('bytes_per_step'), 'd'):>10}" if with_bytes else "")
        )
    return "\n".join(lines)


def plot(summary, results, out_dir):
    """loss_vs_steps.png and loss_vs_time.png in `out_dir`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per optimizer, one line style per learning rate.
    names = list(dict.fromkeys(r["optimizer"] for r in results))
    rates = sorted({r["learning_rate"] for r in results})
    styles = ["-", "--", ":", "-."]
    colours = plt.get_cmap("tab10")
    paths = []
    for name, axis, label in (
        ("loss_vs_steps.png", "steps", "step"),
        ("loss_vs_time.png", "seconds", "training seconds"),
    ):
        figure, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for r in results:
            losses = [loss for _, loss in r["curve"]]
            xs = [s for s, _ in r["curve"]] if axis == "steps" else r["curve_seconds"]
            ax.plot(
                xs,
                losses,
                color=colours(names.index(r["optimizer"]) % 10),
                linestyle=styles[rates.index(r["learning_rate"]) % len(styles)],
                label=f"{r['optimizer']} lr={r['learning_rate']:g}",
            )
        ax.axhline(summary["target"], color="black", linewidth=0.8, label="target")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(summary.get("metric", "loss"))
        ax.set_title(f"{summary['task']}")
        ax.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        path = f"{out_dir}/{name}"
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)
    return paths
