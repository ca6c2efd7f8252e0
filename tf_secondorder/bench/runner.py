"""Trains one optimizer on one task with model.fit and records loss and timing."""

import contextlib
import re
import time

import keras
import numpy as np

import tf_secondorder as tfso
from tf_secondorder import validation
from tf_secondorder.compat import replica_state, trainer

# Every optimizer runs with its library defaults: what a user's
# `tfso.Shampoo(learning_rate=...)` does. Options for one run come from the
# command line (`--option`, see bench/options.py) and are recorded with it.
KERAS_OPTIMIZERS = {
    "adam": lambda lr, **o: keras.optimizers.Adam(lr, **o),
    "adamw": lambda lr, **o: keras.optimizers.AdamW(lr, **o),
    "sgd": lambda lr, **o: keras.optimizers.SGD(lr, **{"momentum": 0.9, **o}),
    "lion": lambda lr, **o: keras.optimizers.Lion(lr, **o),
    "muon": lambda lr, **o: keras.optimizers.Muon(lr, **o),
}

# Keys of `--option diloco:KEY=VALUE` and `--option localsgd:KEY=VALUE` that
# are the bench's own rather than the inner optimizer's or the communication
# options, with what they set.
BENCH_KEYS = {
    "diloco": {
        "outer_learning_rate": "the outer Nesterov SGD's learning rate (0.8)",
        "outer_momentum": "its momentum (0.3; 0: plain SGD)",
        "average_optimizer_state": "false: average the weights only (true)",
    },
    "localsgd": {
        "average_optimizer_state": "false: average the weights only (true)",
    },
}


def _communication_split(options):
    """(the inner optimizer's options, the communication options)."""
    from tf_secondorder.bench.options import communication_keys

    keys = communication_keys()
    inner = {k: v for k, v in options.items() if k not in keys}
    return inner, {k: v for k, v in options.items() if k in keys}


def _merge(name, communication, given):
    """`communication` (from "+CODEC") and `given` (options), disjoint."""
    twice = sorted(set(communication) & set(given))
    if twice:
        raise TypeError(
            f"{name}: {twice[0]!r} is set both by the name's '+' and by an option"
        )
    return {**communication, **given}


def _averaged(optimizer, average_optimizer_state):
    """`optimizer`, averaging the weights only when `average_optimizer_state`
    is false (local SGD's measured alternative)."""
    if not validation.boolean("average_optimizer_state", average_optimizer_state):
        optimizer.averaged_variables = lambda: list(
            trainer.optimizer_trainable_variables(optimizer)
        )
    return optimizer


def _diloco(
    lr,
    compression=None,
    outer_learning_rate=0.8,
    outer_momentum=0.3,
    average_optimizer_state=True,
    **options,
):
    """DiLoCo: AdamW inside, 32 local steps, an outer Nesterov SGD with lr
    0.8 and momentum 0.3; "+CODEC" compresses the pseudo-gradients. With
    one replica it is AdamW. The paper's outer step (lr 0.7, momentum 0.9)
    overshot at 32 local steps on 2 replicas: 1.39x synchronous Adam's final
    loss on digits-ae and 1.16x on pydoc-lm, against 0.97x and 0.92x with
    this one (`--option diloco:outer_learning_rate=0.7 --option
    diloco:outer_momentum=0.9`)."""
    inner, given = _communication_split(options)
    # JSON reads "0" as an int, which Keras's SGD rejects as a momentum.
    momentum = float(outer_momentum)
    outer = keras.optimizers.SGD(
        float(outer_learning_rate), momentum=momentum, nesterov=momentum > 0
    )
    communication = {"average_every": 32, "outer_optimizer": outer}
    communication.update(
        _merge("diloco", {"average_compression": compression}, given)
        if compression is not None
        else given
    )
    optimizer = tfso.distributed(keras.optimizers.AdamW(lr, **inner), **communication)
    return _averaged(optimizer, average_optimizer_state)


def _local_sgd(lr, compression=None, average_optimizer_state=True, **options):
    """Local SGD: Adam inside, the replicas' weights (and, unless
    `average_optimizer_state` is false, optimizer state) averaged every 32
    steps (no outer optimizer); "+CODEC" compresses the averaged change."""
    inner, given = _communication_split(options)
    communication = {"average_every": 32}
    communication.update(
        _merge("localsgd", {"average_compression": compression}, given)
        if compression is not None
        else given
    )
    optimizer = tfso.distributed(keras.optimizers.Adam(lr, **inner), **communication)
    return _averaged(optimizer, average_optimizer_state)


TFSO_OPTIMIZERS = {
    "shampoo": lambda lr, **o: tfso.Shampoo(lr, **o),
    "soap": lambda lr, **o: tfso.SOAP(lr, **o),
    "signsgd": lambda lr, **o: tfso.SignSGD(lr, **{"momentum": 0.9, **o}),
    "onebitadam": lambda lr, **o: tfso.OneBitAdam(lr, **o),
    "compams": lambda lr, **o: tfso.CompAMS(lr, **o),
    "diloco": _diloco,
    "localsgd": _local_sgd,
}


def optimizer_class(base):
    """The class whose arguments `--option BASE:KEY=VALUE` may set (for
    diloco and localsgd: the inner optimizer's)."""
    return {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": keras.optimizers.SGD,
        "lion": keras.optimizers.Lion,
        "muon": keras.optimizers.Muon,
        "shampoo": tfso.Shampoo,
        "soap": tfso.SOAP,
        "signsgd": tfso.SignSGD,
        "onebitadam": tfso.OneBitAdam,
        "compams": tfso.CompAMS,
        "diloco": keras.optimizers.AdamW,
        "localsgd": keras.optimizers.Adam,
    }[base]


def optimizer_names():
    """Every accepted name; any of them may end in "+COMPRESSOR" and then
    "#LABEL"."""
    return sorted(KERAS_OPTIMIZERS) + sorted(TFSO_OPTIMIZERS)


def parse_name(name):
    """ "shampoo+sign" -> ("shampoo", {"compression": "sign"}), checked. A
    "#LABEL" at the end (letters, digits, "_", "-", ".") only tells
    configurations of one optimizer apart: "localsgd#8" is localsgd."""
    label, hash_sign, tag = name.partition("#")
    if hash_sign and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        validation.fail(
            "optimizers",
            "entries whose label after '#' is letters, digits, '_', '-' or '.'",
            name,
        )
    base, _, compression = label.partition("+")
    if base not in KERAS_OPTIMIZERS and base not in TFSO_OPTIMIZERS:
        validation.fail(
            "optimizers",
            f"entries among {optimizer_names()}, each optionally followed by "
            "+COMPRESSOR (e.g. shampoo+sign) and #LABEL (e.g. localsgd#8)",
            name,
        )
    if not compression:
        return base, {}
    if compression not in tfso.compression.names():
        validation.fail(
            "optimizers",
            f"entries whose compressor after '+' is one of {tfso.compression.names()}",
            name,
        )
    return base, {"compression": compression}


def make_optimizer(name, learning_rate, options=None, wrap=False):
    """The optimizer `name` (see `parse_name`) with `options` (its keyword
    arguments, the communication options among them); Keras optimizers go
    through `tfso.distributed` when compressed, given communication options,
    or when `wrap` (to count bytes)."""
    base, communication = parse_name(name)
    options = dict(options or {})
    if base in TFSO_OPTIMIZERS:
        return TFSO_OPTIMIZERS[base](
            learning_rate, **_merge(name, communication, options)
        )
    inner, given = _communication_split(options)
    communication = _merge(name, communication, given)
    optimizer = KERAS_OPTIMIZERS[base](learning_rate, **inner)
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
):
    """Trains `optimizer_name` at `learning_rate` on `task`; returns its record.

    `precision` is the Keras dtype policy the model is built under (set for
    this run only); under `"mixed_float16"` `compile` wraps the optimizer in
    Keras's LossScaleOptimizer.

    The record holds the task-loss curve, step times (median, mean, first),
    optimizer-state bytes and, for Shampoo and SOAP, refresh cost and root
    failures. `repeat` is stored with it (see `report.aggregate`).
    """
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    scope = strategy.scope() if strategy is not None else _no_scope()
    with dtype_policy(precision), scope:
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
    # One epoch: an epoch's end averages local-SGD replicas (SyncReplicas),
    # which would add rounds to the run that its schedule does not have.
    model.fit(
        task.make_dataset(seed),
        steps_per_epoch=task.eval_every * (task.steps // task.eval_every),
        epochs=1,
        callbacks=[recorder],
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
        costs = [
            float(np.median(times[[s - 1 for s in steps]]))
            for steps in (refresh, installs)
            if steps
        ]
        if costs:
            # The costlier of the two kinds of step.
            result["refresh_step_seconds"] = max(costs)
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


class _no_scope:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False
