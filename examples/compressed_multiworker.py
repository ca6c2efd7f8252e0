"""Multi-worker training with compressed gradients, run by `tf-secondorder launch`.

    tf-secondorder launch --workers 2 -- python examples/compressed_multiworker.py
    tf-secondorder launch --workers 2 --rate 1gbit -- \\
        python examples/compressed_multiworker.py --compression sign --epochs 5
    python examples/compressed_multiworker.py     # one process, no strategy

`tf-secondorder launch` starts the workers on 127.0.0.1 with TF_CONFIG set
(`--rate` puts them behind a rate-limited private network; needs root).
Each worker builds the same MultiWorkerMirroredStrategy and model; Keras
splits every global batch across the workers, and `tfso.distributed` sends
the compressed gradient (here 1 bit per parameter for `sign`, with error
feedback) instead of float32. Worker 0 prints the result.
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tf_secondorder as tfso  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--compression", default="sign", help="'none' or a name")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)

    multi_worker = "TF_CONFIG" in os.environ
    strategy = (
        tf.distribute.MultiWorkerMirroredStrategy()
        if multi_worker
        else tf.distribute.get_strategy()
    )
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    chief = task.get("index", 0) == 0

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    data = (
        tf.data.Dataset.from_tensor_slices((x[:split], y[:split]))
        .shuffle(split, seed=0)
        .batch(args.global_batch, drop_remainder=True)
        .repeat()
    )
    compression = None if args.compression == "none" else args.compression
    with strategy.scope():
        keras.utils.set_random_seed(0)  # same initial weights on every worker
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=tfso.distributed(
                keras.optimizers.Adam(args.learning_rate), compression=compression
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    steps = args.steps_per_epoch or split // args.global_batch
    model.fit(
        data,
        epochs=args.epochs,
        steps_per_epoch=steps,
        verbose=2 if chief else 0,
        callbacks=[tfso.callbacks.CommunicationStats()],
    )
    loss, accuracy = model.evaluate(x[split:], y[split:], verbose=0)
    stats = model.optimizer.communication_stats()
    if chief:
        print(
            f"replicas {strategy.num_replicas_in_sync}, compression {compression}: "
            f"held-out accuracy {accuracy:.4f}, loss {loss:.4f}, "
            f"bytes per replica per step {stats['bytes_per_step']} "
            f"(float32: {stats['float32_bytes_per_step']})"
        )


if __name__ == "__main__":
    main()
