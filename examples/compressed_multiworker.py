"""Multi-worker training with compressed communication, run by `tf-secondorder launch`.

    tf-secondorder launch --workers 2 -- python examples/compressed_multiworker.py
    tf-secondorder launch --workers 2 --rate 1gbit -- \\
        python examples/compressed_multiworker.py --compare
    python examples/compressed_multiworker.py     # one process, no strategy

`tf-secondorder launch` starts the workers on 127.0.0.1 with TF_CONFIG set
(`--rate` puts them behind a rate-limited private network; needs root).
Each worker builds the same MultiWorkerMirroredStrategy and model; Keras
splits every global batch across the workers.

The default optimizer is `tfso.OneBitAdam`: Adam for its first steps, then
the second moment frozen and each worker's momentum sent as one bit per
element (plus a scale per 256), with error feedback. Adam itself with
1-bit gradients trains badly (the compression error reaches its second
moment); `--optimizer adam --compression int8` is the alternative for
Adam. `--compare` trains the same model uncompressed first and prints both
held-out accuracies. Worker 0 prints the results.
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


def make_optimizer(name, learning_rate, compression):
    """`compression`: None (float32), "default" (the optimizer's own) or a name."""
    options = {} if compression == "default" else {"compression": compression}
    if name == "one_bit_adam":
        return tfso.OneBitAdam(learning_rate, **options)
    return tfso.distributed(keras.optimizers.Adam(learning_rate), **options)


def train(strategy, data, steps, args, compression, chief):
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
            optimizer=make_optimizer(args.optimizer, args.learning_rate, compression),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    model.fit(
        data,
        epochs=args.epochs,
        steps_per_epoch=steps,
        shuffle=False,  # the dataset shuffles itself
        verbose=2 if chief and args.verbose else 0,
        callbacks=[tfso.callbacks.CommunicationStats()],
    )
    return model


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--optimizer", default="one_bit_adam", choices=["one_bit_adam", "adam"]
    )
    parser.add_argument(
        "--compression",
        default="default",
        help="'default' (the optimizer's own), 'none' or a compressor name",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--compare", action="store_true", help="train uncompressed too")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    multi_worker = "TF_CONFIG" in os.environ
    strategy = (
        tfso.distribute.multi_worker_strategy()
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
    steps = args.steps_per_epoch or split // args.global_batch
    compression = None if args.compression == "none" else args.compression
    runs = [("float32", None)] if args.compare else []
    runs.append((args.compression, compression))
    for label, setting in runs:
        model = train(strategy, data, steps, args, setting, chief)
        loss, accuracy = model.evaluate(x[split:], y[split:], verbose=0)
        stats = model.optimizer.communication_stats()
        rounds = max(stats["rounds"], 1)
        if chief:
            print(
                f"replicas {strategy.num_replicas_in_sync}, {args.optimizer}, "
                f"compression {label}: held-out accuracy {accuracy:.4f}, "
                f"loss {loss:.4f}, bytes per replica per step "
                f"{stats['bytes_per_step']} at the end, "
                f"{stats['bytes_total'] // (args.epochs * steps)} on average "
                f"(float32: {stats['float32_bytes_per_step']}), rounds {rounds}",
                flush=True,
            )


if __name__ == "__main__":
    main()
