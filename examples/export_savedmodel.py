"""Train with Shampoo, export a SavedModel for serving, load it back and check.

    python examples/export_savedmodel.py [--out exported_digits] [--epochs 5]

`model.export` writes a TensorFlow SavedModel with a `serve` signature; the
optimizer is not part of it (serving needs only the forward pass). The
example reloads it with `tf.saved_model.load`, as TF Serving or TFLite
conversion would, and checks that it gives the trained model's outputs.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import tf_secondorder as tfso


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="exported_digits")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=tfso.Shampoo(learning_rate=3e-3, precondition_frequency=20),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=64, epochs=args.epochs, verbose=2)

    model.export(args.out, verbose=False)
    served = tf.saved_model.load(args.out)
    expected = model.predict(x[:256], verbose=0)
    got = served.serve(tf.constant(x[:256])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    accuracy = float(np.mean(np.argmax(got, axis=1) == y[:256]))
    print(
        f"exported to {args.out}: serve() matches the model "
        f"(max diff {np.abs(got - expected).max():.2e}), accuracy {accuracy:.4f}"
    )


if __name__ == "__main__":
    main()
