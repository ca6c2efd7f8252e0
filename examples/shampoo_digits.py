"""Classify scikit-learn's digits with Shampoo through model.compile/fit.

    python examples/shampoo_digits.py [--epochs 10] [--strategy mirrored]

Runs offline on CPU in well under a minute. With ``--strategy mirrored`` it
trains under tf.distribute.MirroredStrategy over the visible devices (set
``--logical-cpus 2`` to split one CPU into two replicas).
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import tf_secondorder as tfso


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--strategy", choices=["none", "mirrored"], default="none")
    parser.add_argument("--logical-cpus", type=int, default=0)
    parser.add_argument("--save", default=None, help="path of a .keras file to write")
    parser.add_argument("--seed", type=int, default=0, help="initial weights' seed")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    if args.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
        )

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))

    strategy = (
        tf.distribute.MirroredStrategy()
        if args.strategy == "mirrored"
        else tf.distribute.get_strategy()
    )
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(256, activation="tanh"),
                keras.layers.Dense(128, activation="tanh"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=tfso.Shampoo(
                learning_rate=1e-3, precondition_frequency=20, block_size=256
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    model.fit(
        x[:split],
        y[:split],
        batch_size=64,
        epochs=args.epochs,
        validation_data=(x[split:], y[split:]),
        verbose=2,
    )
    loss, accuracy = model.evaluate(x[split:], y[split:], verbose=0)
    print(
        f"held-out accuracy {accuracy:.3f}, root failures "
        f"{int(model.optimizer.root_failures.numpy())}"
    )
    if args.save:
        model.save(args.save)
    return accuracy


if __name__ == "__main__":
    main()
