"""Training script for the multi-worker tests (run by `tf-secondorder launch`).

    python multi_worker_train.py --strategy multi_worker --out DIR \
        --configs shampoo,adam+qsgd [--backup DIR] [--kill WORKER,EPOCH,BATCH]

Trains one small regression model per config on the same data and writes
`DIR/<config>-worker<i>.npz`: the model weights (`w0`, `w1`, ...), the
optimizer variables (`o0`, ...; per-replica ones as [local replicas, ...])
and the loss history. `--strategy mirrored` runs the same on 2 logical CPUs
of one process, for comparison. `--kill` makes that worker SIGKILL itself
before that batch on the first attempt (`TFSO_RESTART=0`).
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
from tf_secondorder.distribute._keras_hooks import (  # noqa: E402
    HOOK_CALLS,
    ReplicaLocalVariable,
    worker_index,
)

GLOBAL_BATCH = 32
EXAMPLES = 256


def make_optimizer(config):
    name, _, compression = config.partition("+")
    options = {"compression": compression} if compression else {}
    if name in ("shampoo", "shampoo-unsplit"):
        return tfso.Shampoo(
            distribute_roots=name == "shampoo",
            learning_rate=1e-2,
            precondition_frequency=3,
            block_size=8,
            epsilon=1e-4,
            **options,
        )
    if name == "adam":
        return tfso.distributed(keras.optimizers.Adam(1e-2), **options)
    if name == "signsgd":
        return tfso.SignSGD(learning_rate=1e-3, momentum=0.9)
    raise ValueError(f"unknown config {config!r}")


def dataset():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 3))).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


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


def state_arrays(model):
    arrays = {f"w{i}": np.asarray(w.numpy()) for i, w in enumerate(model.weights)}
    for i, v in enumerate(model.optimizer.variables):
        if isinstance(v, ReplicaLocalVariable):
            arrays[f"o{i}"] = v.replica_values()
        else:
            arrays[f"o{i}"] = np.asarray(v.numpy())
    return arrays


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="multi_worker")
    parser.add_argument("--configs", default="shampoo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backup", default=None)
    parser.add_argument("--kill", default=None)
    args = parser.parse_args()

    if args.strategy == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        strategy = tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")]
        )
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = worker_index(strategy)
    attempt = int(os.environ.get("TFSO_RESTART", "0"))
    print(f"replicas={strategy.num_replicas_in_sync} attempt={attempt}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    for config in args.configs.split(","):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = keras.Sequential(
                [
                    keras.Input((8,)),
                    keras.layers.Dense(16, activation="tanh"),
                    keras.layers.Dense(3),
                ]
            )
            model.compile(optimizer=make_optimizer(config), loss="mse")
        callbacks = []
        if args.backup:
            callbacks.append(
                tfso.callbacks.BackupAndRestore(os.path.join(args.backup, config))
            )
        if args.kill and attempt == 0:
            worker, epoch, batch = map(int, args.kill.split(","))
            if worker == index:
                callbacks.append(KillAt(epoch, batch))
        history = model.fit(
            dataset(), epochs=args.epochs, verbose=2, callbacks=callbacks
        )
        arrays = state_arrays(model)
        arrays["loss"] = np.asarray(history.history["loss"])
        np.savez(os.path.join(args.out, f"{config}-worker{index}.npz"), **arrays)
    with open(os.path.join(args.out, f"hooks-worker{index}.json"), "w") as f:
        json.dump(dict(HOOK_CALLS), f)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
