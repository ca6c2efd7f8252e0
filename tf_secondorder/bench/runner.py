"""Trains one optimizer on one task with model.fit and records loss and timing."""

import time

import keras
import numpy as np

import tf_secondorder as tfso

# Shampoo settings used by the benchmark unless overridden on the command line
# (chosen on digits-ae, see docs/benchmarks.md; the library's own defaults are
# the general-purpose ones).
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
):
    """Trains `optimizer_name` at `learning_rate` on `task`; returns its record.

    The record holds the task-loss curve, step times (median, mean, first),
    optimizer-state bytes and, for Shampoo and SOAP, refresh cost and root
    failures. `repeat` is stored with it (see `aggregate`).
    """
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
        shuffle=False,  # the dataset shuffles itself
    )
    times = np.array(recorder.step_times)
    later = times[1:] if len(times) > 1 else times
    base = parse_name(optimizer_name)[0]
    state_bytes = variable_bytes(optimizer.variables)
    weight_bytes = variable_bytes(model.trainable_variables)
    result = {
        "optimizer": optimizer_name,
        "learning_rate": learning_rate,
        "replicas": replicas,
        "repeat": repeat,
        "seed": seed,
        "options": dict(BENCH_OPTIONS.get(base, {}), **(options or {})),
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
        if len(ordinary):
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
    """Adds target, steps/time-to-target and ratios to the baseline in place.

    `results` are the runs of one repeat: the target is the final loss of the
    best `baseline` run among them, and every ratio compares with that run.
    """
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
        r["first_step_ratio"] = (
            r["first_step_seconds"] / best_base["first_step_seconds"]
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


# Per-run numbers that `aggregate` reports as median and spread over repeats.
# A run that never reaches the target counts as infinitely slow there.
AGGREGATED = (
    "final_loss",
    "steps_to_target",
    "steps_ratio",
    "step_time_ratio",
    "amortized_step_time_ratio",
    "time_ratio",
    "first_step_ratio",
    "refresh_cost",
    "state_memory_ratio",
    "bytes_per_step",
)
_NEVER = ("steps_to_target", "steps_ratio", "time_ratio")


def spread(values, missing_is_infinite=False):
    """{"median", "min", "max", "values"} of `values`.

    None entries are runs that never reached the target: with
    `missing_is_infinite` they count as +infinity (and a statistic that lands
    on one is None), otherwise they are left out.
    """
    numbers = [
        float("inf") if v is None else float(v)
        for v in values
        if v is not None or missing_is_infinite
    ]
    if not numbers:
        return {"median": None, "min": None, "max": None, "values": list(values)}

    def finite(x):
        return None if x == float("inf") else float(x)

    ordered = sorted(numbers)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        median = ordered[middle]
    else:
        median = (ordered[middle - 1] + ordered[middle]) / 2
    return {
        "median": finite(median),
        "min": finite(ordered[0]),
        "max": finite(ordered[-1]),
        "values": list(values),
    }


def aggregate(results):
    """One entry per (optimizer, learning rate): median and spread over repeats.

    Each entry has "optimizer", "learning_rate", "repeats" (the number of
    runs) and, for each name in `AGGREGATED` that its runs report,
    {"median", "min", "max", "values"} (see `spread`).
    """
    groups = {}
    for r in results:
        groups.setdefault((r["optimizer"], r["learning_rate"]), []).append(r)
    entries = []
    for (name, lr), runs in groups.items():
        entry = {"optimizer": name, "learning_rate": lr, "repeats": len(runs)}
        for key in AGGREGATED:
            if any(key in r for r in runs):
                entry[key] = spread(
                    [r.get(key) for r in runs], missing_is_infinite=key in _NEVER
                )
        entries.append(entry)
    return entries


def _fmt(value, spec):
    return format(value, spec) if value is not None else "-"


def format_table(summary, results, configurations=None):
    """The results table: one row per run, or with `configurations` (from
    `aggregate`, more than one repeat) one row per optimizer and learning
    rate with each number's median and [min-max] over the repeats."""
    repeats = max((c["repeats"] for c in configurations or []), default=1)
    head = (
        f"task {summary['task']}: target {summary['target']:.5f} "
        f"(best {summary['baseline']}, lr {summary['baseline_lr']:g})"
    )
    if repeats > 1:
        return _format_repeats(summary, configurations, repeats)
    width = max([11] + [len(r["optimizer"]) for r in results])
    with_bytes = any("bytes_per_step" in r for r in results)
    lines = [
        head,
        f"{'optimizer':<{width}} lr       final     steps->tgt  steps x  step-time x  "
        "(amortised)  time->tgt x  refresh x  first-step x  state/weights"
        + ("  bytes/step" if with_bytes else ""),
    ]
    for r in results:
        lines.append(
            f"{r['optimizer']:<{width}} {r['learning_rate']:<8g} {r['final_loss']:<9.5f} "
            f"{_fmt(r['steps_to_target'], 'd'):>10}  {_fmt(r['steps_ratio'], '.2f'):>7}  "
            f"{r['step_time_ratio']:>11.2f}  {r['amortized_step_time_ratio']:>11.2f}  "
            f"{_fmt(r['time_ratio'], '.2f'):>11}  "
            f"{_fmt(r.get('refresh_cost'), '.1f'):>9}  "
            f"{_fmt(r.get('first_step_ratio'), '.2f'):>12}  "
            f"{_fmt(r.get('state_memory_ratio'), '.2f'):>13}"
            + (f"  {_fmt(r.get('bytes_per_step'), 'd'):>10}" if with_bytes else "")
        )
    return "\n".join(lines)


def _format_repeats(summary, configurations, repeats):
    columns = [
        ("final", "final_loss", ".5f"),
        ("steps->tgt", "steps_to_target", ".0f"),
        ("steps x", "steps_ratio", ".2f"),
        ("step-time x", "step_time_ratio", ".2f"),
        ("(amortised)", "amortized_step_time_ratio", ".2f"),
        ("time->tgt x", "time_ratio", ".2f"),
        ("refresh x", "refresh_cost", ".1f"),
        ("first-step x", "first_step_ratio", ".2f"),
        ("state/weights", "state_memory_ratio", ".2f"),
    ]
    if any("bytes_per_step" in c for c in configurations):
        columns.append(("bytes/step", "bytes_per_step", ".0f"))

    def cell(stats, spec):
        if stats is None:
            return "-"
        if stats["min"] is None and stats["median"] is None:
            return "-"
        low = _fmt(stats["min"], spec)
        high = _fmt(stats["max"], spec) if stats["max"] is not None else "never"
        middle = _fmt(stats["median"], spec) if stats["median"] is not None else "-"
        return middle if low == high else f"{middle} [{low}-{high}]"

    rows = [
        [c["optimizer"], f"{c['learning_rate']:g}"]
        + [cell(c.get(key), spec) for _, key, spec in columns]
        for c in configurations
    ]
    header = ["optimizer", "lr"] + [title for title, _, _ in columns]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]

    def line(row):
        left = [f"{row[0]:<{widths[0]}}", f"{row[1]:<{widths[1]}}"]
        right = [f"{v:>{w}}" for v, w in zip(row[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    head = (
        f"task {summary['task']}: median [min-max] over {repeats} repeats "
        f"(seeds {', '.join(str(s) for s in summary.get('seeds', []))}); "
        "each repeat's target is its best "
        f"{summary['baseline']}'s final loss (first repeat: {summary['target']:.5f}, "
        f"lr {summary['baseline_lr']:g})"
    )
    return "\n".join([head, line(header)] + [line(row) for row in rows])


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
                # Later repeats: same colour and style, fainter, one legend entry.
                alpha=1.0 if r.get("repeat", 0) == 0 else 0.4,
                label=(
                    f"{r['optimizer']} lr={r['learning_rate']:g}"
                    if r.get("repeat", 0) == 0
                    else None
                ),
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
