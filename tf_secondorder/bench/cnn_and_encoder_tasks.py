"""Bench tasks of the shapes most Keras models have: a conv net with
BatchNorm, a Transformer encoder and a plain MLP classifier, on the same
offline data as the others.

`digits-cnn`: a VGG-style conv net with BatchNorm classifying scikit-learn's
8x8 digits (1497 training images with random one-pixel shifts, 300 held
out); the metric is held-out cross-entropy.

`pydoc-encoder`: a bidirectional byte-level Transformer encoder trained by
masked-byte prediction (BERT's 15%: of the chosen positions 80% become a
mask token, 10% a random byte, 10% stay) on the pydoc corpus; the metric is
the held-out loss on the masked positions of fixed windows and masks.

`digits-mlp`: a 3-layer MLP (64-256-256-10) classifying all 1797 digits,
batch 128, 300 steps; the metric is the training-set cross-entropy, the
loss the optimizer minimises (a first model a Keras user tries).

All read their data through `tfds.load` (`tasks.digits_images`,
`tasks.pydoc_splits`); nothing is downloaded.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_secondorder.bench import tasks

HELD_OUT_DIGITS = 300
MASK_RATE = 0.15
MASK_TOKEN = 256  # one past the bytes


def digits_cnn(steps=1000, batch_size=64, data_dir=None):
    """`digits-cnn`: conv net with BatchNorm on the digits; held-out cross-entropy."""
    x, y = tasks.digits_images(data_dir)
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

    return tasks.Task(
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


def _mask(windows, rng):
    """(inputs, sample weights) for masked-byte prediction of `windows`."""
    chosen = rng.random(windows.shape) < MASK_RATE
    action = rng.random(windows.shape)
    inputs = windows.copy()
    inputs[chosen & (action < 0.8)] = MASK_TOKEN
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    inputs[randomised] = rng.integers(0, 256, size=int(randomised.sum()))
    return inputs, chosen.astype("float32")


def pydoc_encoder(
    steps=600, context=128, batch_size=32, eval_windows=256, data_dir=None
):
    """`pydoc-encoder`: masked-byte Transformer encoder on the pydoc corpus."""
    train, held_out = tasks.pydoc_splits(data_dir)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make_dataset(seed, batch_size=batch_size):
        corpus = tf.constant(train.astype("int32"))
        starts = tf.data.Dataset.random(seed=seed).map(
            lambda r: tf.math.floormod(r, len(train) - context)
        )

        def masked(start, draw):
            window = corpus[start : start + context]
            uniform = tf.random.stateless_uniform([2, context], draw)
            chosen = uniform[0] < MASK_RATE
            replaced = tf.where(
                uniform[1] < 0.8,
                MASK_TOKEN,
                tf.where(
                    uniform[1] < 0.9,
                    tf.random.stateless_uniform(
                        [context], draw + 1, maxval=256, dtype=tf.int32
                    ),
                    window,
                ),
            )
            inputs = tf.where(chosen, replaced, window)
            return inputs, window, tf.cast(chosen, tf.float32)

        draws = tf.data.Dataset.random(seed=seed + 1).map(
            lambda r: tf.stack([r, r // 2])
        )
        data = tf.data.Dataset.zip(starts, draws).map(masked)
        return data.batch(batch_size, drop_remainder=True).prefetch(2)

    rng = np.random.default_rng(1234)
    starts = rng.integers(0, len(held_out) - context, size=eval_windows)
    windows = np.stack([held_out[s : s + context] for s in starts]).astype("int32")
    eval_x, eval_weights = _mask(windows, rng)
    eval_x = tf.constant(eval_x)

    def evaluate(model):
        logits = model.predict(eval_x, batch_size=64, verbose=0)
        per_byte = keras.losses.sparse_categorical_crossentropy(
            windows, logits, from_logits=True
        )
        per_byte = np.asarray(per_byte)
        return float((per_byte * eval_weights).sum() / eval_weights.sum())

    return tasks.Task(
        name="pydoc-encoder",
        steps=steps,
        eval_every=50,
        batch_size=batch_size,
        make_model=lambda seed: tasks.byte_transformer(
            context=context, seed=seed, vocabulary=MASK_TOKEN + 1, causal=False
        ),
        make_dataset=make_dataset,
        evaluate=evaluate,
        loss=loss_fn,
        info={
            "metric": "held-out masked-byte loss (nats/byte)",
            "source": "TFDS pydoc_topics (built locally)",
            "tokens_per_step": batch_size * context,
        },
    )


def digits_mlp(steps=300, batch_size=128, data_dir=None):
    """`digits-mlp`: a 3-layer MLP classifier on the digits; training-set
    cross-entropy (the loss the optimizer minimises, over all 1797 images)."""
    x, y = tasks.digits_images(data_dir)
    all_x, all_y = tf.constant(x), y
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make_model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(10),
                # Logits in float32 under a mixed policy, as Keras advises.
                keras.layers.Activation("linear", dtype="float32"),
            ],
            name="digits_mlp",
        )

    def make_examples(seed):
        data = tf.data.Dataset.from_tensor_slices((x, y))
        return data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)

    def make_dataset(seed, batch_size=batch_size):
        data = make_examples(seed).batch(batch_size, drop_remainder=True)
        return data.repeat().prefetch(2)

    def evaluate(model):
        return float(loss_fn(all_y, model(all_x, training=False)))

    return tasks.Task(
        name="digits-mlp",
        steps=steps,
        eval_every=25,
        batch_size=batch_size,
        make_model=make_model,
        make_dataset=make_dataset,
        make_examples=make_examples,
        evaluate=evaluate,
        loss=loss_fn,
        info={
            "examples": int(len(x)),
            "metric": "training-set cross-entropy",
            "source": "TFDS (sklearn_digits, built offline)",
        },
    )
