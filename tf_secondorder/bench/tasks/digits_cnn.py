"""`digits-cnn`: a VGG-style conv net with BatchNorm classifying
scikit-learn's 8x8 digits (1497 training images with random one-pixel
shifts, 300 held out); the metric is held-out cross-entropy."""

import keras
import numpy as np
import tensorflow as tf

from tf_secondorder.bench.tasks.data import digits_images
from tf_secondorder.bench.tasks.registry import Task, register

HELD_OUT_DIGITS = 300


@register(
    "digits-cnn",
    steps=1000,
    eval_every=50,
    description="a conv net with BatchNorm classifying the digits; held-out "
    "cross-entropy",
)
def digits_cnn(steps=1000, batch_size=64, data_dir=None):
    """`digits-cnn`: conv net with BatchNorm on the digits; held-out cross-entropy."""
    x, y = digits_images(data_dir)
    images = x.reshape(-1, 8, 8, 1)
    order = np.random.default_rng(1234).permutation(len(images))
    held, train = order[:HELD_OUT_DIGITS], order[HELD_OUT_DIGITS:]
    train_x, train_y = images[train], y[train]
    held_x, held_y = tf.constant(images[held]), y[held]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make_model(seed):
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((8, 8, 1))]
        for filters, pool in ((32, False), (32, True), (64, False), (64, False)):
            layers += [
                keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
            ]
            if pool:
                layers.append(keras.layers.MaxPooling2D())
        layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
        return keras.Sequential(layers, name="digits_cnn")

    def shift(image, label):
        # A random shift of up to one pixel each way: the usual augmentation,
        # without which 1497 images are memorised in a few hundred steps.
        padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]])
        return tf.image.random_crop(padded, [8, 8, 1]), label

    def make_dataset(seed, batch_size=batch_size):
        tf.random.set_seed(seed)
        data = tf.data.Dataset.from_tensor_slices((train_x, train_y))
        data = data.shuffle(len(train_x), seed=seed, reshuffle_each_iteration=True)
        data = data.map(shift).batch(batch_size, drop_remainder=True)
        return data.repeat().prefetch(2)

    def evaluate(model):
        return float(loss_fn(held_y, model(held_x, training=False)))

    return Task(
        name="digits-cnn",
        steps=steps,
        eval_every=50,
        batch_size=batch_size,
        make_model=make_model,
        make_dataset=make_dataset,
        evaluate=evaluate,
        loss=loss_fn,
        info={
            "examples": int(len(train)),
            "held_out": HELD_OUT_DIGITS,
            "metric": "held-out cross-entropy",
            "source": "TFDS sklearn_digits (built locally)",
        },
    )
