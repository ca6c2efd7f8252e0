"""Train a small CNN on MNIST with Shampoo (TFDS), or offline on digits.

    python examples/mnist_shampoo.py                  # TFDS mnist if prepared
    python examples/mnist_shampoo.py --data digits    # offline: sklearn digits
    python examples/mnist_shampoo.py --epochs 1 --steps-per-epoch 20

MNIST comes from TensorFlow Datasets when the package and the prepared data
are on this machine (it never downloads). Otherwise the example says so and
trains the same model on scikit-learn's 8×8 digits, so it always runs.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

import tf_secondorder as tfso
from tf_secondorder.bench.tasks import TaskUnavailable, load_tfds


def load(data):
    if data in ("auto", "tfds"):
        try:
            x, y = load_tfds("mnist", "train")
            test_x, test_y = load_tfds("mnist", "test")
            return "mnist (TFDS)", (x, y), (test_x, test_y)
        except TaskUnavailable as e:
            if data == "tfds":
                raise
            print(f"{e}\nUsing scikit-learn digits instead.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return "digits (scikit-learn)", (x[:split], y[:split]), (x[split:], y[split:])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", choices=["auto", "tfds", "digits"], default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)

    name, (x, y), (test_x, test_y) = load(args.data)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(x.shape[1:]),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        # Settings from docs/user_guide.md: refresh roots every 50 steps,
        # blocks of 256, Adam grafting (the default).
        optimizer=tfso.Shampoo(
            learning_rate=args.learning_rate,
            precondition_frequency=50,
            block_size=256,
            epsilon=1e-6,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=0)
        .batch(args.batch_size)
        .repeat()
    )
    steps = args.steps_per_epoch or -(-len(x) // args.batch_size)
    # The dataset shuffles itself; `fit` cannot shuffle a dataset.
    model.fit(data, epochs=args.epochs, steps_per_epoch=steps, shuffle=False, verbose=2)
    loss, accuracy = model.evaluate(test_x, test_y, verbose=0)
    print(
        f"{name}: test loss {loss:.4f}, test accuracy {accuracy:.4f}, "
        f"root failures {int(model.optimizer.root_failures.numpy())}"
    )


if __name__ == "__main__":
    main()
