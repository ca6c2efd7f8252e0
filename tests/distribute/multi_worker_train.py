"""Training script for the multi-worker tests (run by `tf-secondorder launch`).

    python multi_worker_train.py --out DIR --configs shampoo,adam+qsgd \
        [--backup DIR] [--kill-config CONFIG --kill WORKER,EPOCH,BATCH \
         --killed-out DIR --killed-backup DIR]

(with the repository root on PYTHONPATH). Trains one small regression model
per config on the same data under MultiWorkerMirroredStrategy and writes
`DIR/<config>-worker<i>.npz` (see `state_arrays`), then the hook counts of
those runs to `DIR/hooks-worker<i>.json`.

With `--kill-config`, it then trains that config once more from scratch into
`--killed-out`, backed up by `tfso.callbacks.BackupAndRestore`; on the first
attempt (`TFSO_RESTART=0`) worker WORKER SIGKILLs itself before batch BATCH
of epoch EPOCH. The launcher restarts both workers; a restarted attempt skips
the configs every worker has finished and resumes the killed run from its
backup. One launch so serves the plain runs and the restart test.

`train_config` and `state_arrays` are also used in the test process (2
logical CPUs under MirroredStrategy, or no strategy in float64).
"""

import argparse
import json
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_secondorder as tfso  # noqa: E402
from tests.helpers import (  # noqa: E402
    apply_test_thread_setting,
    shampoo_factor_pairs,
)

GLOBAL_BATCH = 32
EXAMPLES = 256
BLOCK_SIZE = 8
EPSILON = 1e-4
# Shampoo refreshes at steps 3, 6, ...: steps 1-2 are the same ops with split
# and unsplit roots; 8 steps per epoch, so 24 (a refresh) ends the run.
FIRST_REFRESH = 3
EPOCHS = 3


def make_optimizer(config):
    name, _, compression = config.partition("+")
    options = {"compression": compression} if compression else {}
    if name in ("shampoo", "shampoo-unsplit"):
        return tfso.Shampoo(
            distribute_roots=name == "shampoo",
            learning_rate=1e-2,
            precondition_frequency=FIRST_REFRESH,
            block_size=BLOCK_SIZE,
            epsilon=EPSILON,
            root_refresh="in_step",
            **options,
        )
    if name == "shampoo-pipelined":
        # Roots of step t computed on each worker's host, installed at t + 2
        # with the install's all_gather (distribute_roots).
        return tfso.Shampoo(
            learning_rate=1e-2,
            precondition_frequency=FIRST_REFRESH,
            block_size=BLOCK_SIZE,
            epsilon=EPSILON,
            root_refresh="pipelined",
            refresh_delay=2,
            **options,
        )
    if name == "adam":
        return tfso.distributed(keras.optimizers.Adam(1e-2), **options)
    raise ValueError(f"unknown config {config!r}")


def dataset(dtype="float32"):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 3))).astype("float32")
    # A float64 run sees the same numbers, widened exactly.
    x, y = x.astype(dtype), y.astype(dtype)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


def make_model(dtype="float32"):
    def build(dtype):
        return keras.Sequential(
            [
                keras.Input((8,), dtype=dtype),
                keras.layers.Dense(16, activation="tanh", dtype=dtype),
                keras.layers.Dense(3, dtype=dtype),
            ]
        )

    keras.utils.set_random_seed(1)
    model = build("float32")
    if dtype != "float32":
        weights = model.get_weights()
        model = build(dtype)
        model.set_weights([w.astype(dtype) for w in weights])
    return model


class KillAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.kill_epoch, self.kill_batch, self.epoch = epoch, batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == (self.kill_epoch, self.kill_batch):
            print(f"killing myself at epoch {self.epoch} batch {batch}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _is_per_replica(variable):
    """Per-replica optimizer state (e.g. error-feedback memories) has one
    value per replica, read with `replica_values()`."""
    return hasattr(variable, "replica_values")


def _values(variables):
    return {
        f"o{i}": (
            np.asarray(v.replica_values())
            if _is_per_replica(v)
            else np.asarray(v.numpy())
        )
        for i, v in enumerate(variables)
    }


def state_arrays(model):
    """`w<i>` the weights, `o<i>` the optimizer variables (per-replica ones as
    [local replicas, ...], listed in `per_replica`), `paths` their paths and,
    for Shampoo, `factors` the (statistics, root, row, p) of every factor
    (variable indices and the row in those stacked variables)."""
    optimizer = model.optimizer
    arrays = {f"w{i}": np.asarray(w.numpy()) for i, w in enumerate(model.weights)}
    arrays.update(_values(optimizer.variables))
    arrays["paths"] = np.array([v.path for v in optimizer.variables])
    arrays["per_replica"] = np.array(
        [f"o{i}" for i, v in enumerate(optimizer.variables) if _is_per_replica(v)]
        or [""]
    )
    if isinstance(optimizer, tfso.Shampoo):
        index = {v.path: i for i, v in enumerate(optimizer.variables)}
        arrays["factors"] = np.array(
            [
                (index[s.variable.path], index[r.variable.path], s.row, p)
                for s, r, p in shampoo_factor_pairs(model, optimizer, BLOCK_SIZE)
            ]
        )
    return arrays


class FirstRefresh(keras.callbacks.Callback):
    """Keeps the optimizer variables right after step FIRST_REFRESH."""

    def __init__(self):
        super().__init__()
        self.arrays = {}

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        if int(optimizer.iterations.numpy()) == FIRST_REFRESH:
            values = _values(optimizer.variables)
            self.arrays = {f"first/{k}": v for k, v in values.items()}


def train_config(strategy, config, epochs=EPOCHS, callbacks=(), dtype="float32"):
    """(state_arrays of the trained model, with `loss` and `first/o<i>`)."""
    scope = strategy.scope() if strategy is not None else _NoScope()
    with scope:
        model = make_model(dtype)
        model.compile(optimizer=make_optimizer(config), loss="mse")
    first = FirstRefresh()
    history = model.fit(
        dataset(dtype),
        epochs=epochs,
        shuffle=False,  # a dataset; `fit` cannot shuffle it
        verbose=2 if strategy is not None else 0,
        callbacks=list(callbacks) + [first],
    )
    arrays = state_arrays(model)
    arrays.update(first.arrays)
    arrays["loss"] = np.asarray(history.history["loss"])
    return arrays


class _NoScope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _worker_index(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="shampoo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--backup", default=None)
    parser.add_argument("--kill-config", default=None)
    parser.add_argument("--kill", default=None)
    parser.add_argument("--killed-out", default=None)
    parser.add_argument("--killed-backup", default=None)
    args = parser.parse_args()

    apply_test_thread_setting()
    strategy = tfso.distribute.multi_worker_strategy()
    index = _worker_index(strategy)
    workers = int(os.environ.get("TFSO_NUM_WORKERS", "1"))
    attempt = int(os.environ.get("TFSO_RESTART", "0"))
    print(f"replicas={strategy.num_replicas_in_sync} attempt={attempt}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    hooks = [os.path.join(args.out, f"hooks-worker{i}.json") for i in range(workers)]
    # Every worker sees the same files, so all skip or none does.
    if not all(os.path.exists(path) for path in hooks):
        from tf_secondorder.compat import testing

        with testing.count_hook_calls() as calls:
            for config in args.configs.split(","):
                callbacks = []
                if args.backup:
                    callbacks.append(
                        tfso.callbacks.BackupAndRestore(
                            os.path.join(args.backup, config)
                        )
                    )
                arrays = train_config(strategy, config, callbacks=callbacks)
                np.savez(
                    os.path.join(args.out, f"{config}-worker{index}.npz"), **arrays
                )
        with open(hooks[index], "w") as f:
            json.dump(dict(calls), f)
        print("plain configs done", flush=True)
    if args.kill_config:
        config = args.kill_config
        os.makedirs(args.killed_out, exist_ok=True)
        callbacks = [
            tfso.callbacks.BackupAndRestore(os.path.join(args.killed_backup, config))
        ]
        worker, epoch, batch = map(int, args.kill.split(","))
        if attempt == 0 and worker == index:
            callbacks.append(KillAt(epoch, batch))
        arrays = train_config(strategy, config, callbacks=callbacks)
        np.savez(os.path.join(args.killed_out, f"{config}-worker{index}.npz"), **arrays)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
