"""`digits-ae`: a deep autoencoder on scikit-learn's digits."""

import keras
import numpy as np
import tensorflow as tf

from tf_secondorder.bench.tasks.data import digits_images, tfds_module
from tf_secondorder.bench.tasks.registry import Task, register

WIDTHS = [512, 256, 128, 16, 128, 256, 512]


@register(
    "digits-ae",
    steps=2000,
    eval_every=50,
    description="a deep autoencoder on scikit-learn's digits; full-data MSE",
)
def digits_autoencoder(steps=2000, data_dir=None):
    """`digits-ae`: a deep autoencoder on scikit-learn's digits (1797 x 64,
    scaled to [0, 1]); Dense 64-512-256-128-16-128-256-512-64, tanh hidden
    layers, a linear 16-unit code, a sigmoid output; the metric is the MSE
    on all 1797 images."""
    tfds = tfds_module()
    x, _ = digits_images(data_dir)

    def make_model(seed):
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((64,))]
        for width in WIDTHS:
            layers.append(
                keras.layers.Dense(width, activation=None if width == 16 else "tanh")
            )
        layers.append(keras.layers.Dense(64, activation="sigmoid"))
        return keras.Sequential(layers, name="digits_autoencoder")

    def to_pair(example):
        image = tf.reshape(tf.cast(example["image"], tf.float32), [64]) / 16.0
        return image, image

    def make_examples(seed):
        data = tfds.load(
            "sklearn_digits", split="train", data_dir=data_dir, download=False
        )
        data = data.map(to_pair).cache()
        return data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)

    def make_dataset(seed, batch_size=128):
        data = make_examples(seed).batch(batch_size, drop_remainder=True)
        return data.repeat().prefetch(2)

    full = tf.constant(x)

    def evaluate(model):
        return float(np.mean(np.square(model(full, training=False).numpy() - x)))

    return Task(
        name="digits-ae",
        steps=steps,
        eval_every=50,
        batch_size=128,
        make_model=make_model,
        make_dataset=make_dataset,
        make_examples=make_examples,
        evaluate=evaluate,
        loss="mse",
        info={
            "examples": int(len(x)),
            "metric": "full-data MSE",
            "source": "TFDS sklearn_digits (built locally)",
        },
    )
