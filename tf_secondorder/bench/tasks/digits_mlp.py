"""`digits-mlp`: a 3-layer MLP (64-256-256-10) classifying all 1797 digits,
batch 128, 300 steps; the metric is the training-set cross-entropy, the
loss the optimizer minimises (a first model a Keras user tries)."""

import keras
import tensorflow as tf

from tf_secondorder.bench.tasks.data import digits_images
from tf_secondorder.bench.tasks.registry import Task, register


@register(
    "digits-mlp",
    steps=300,
    eval_every=25,
    description="a 3-layer MLP classifying the digits; training-set cross-entropy",
)
def digits_mlp(steps=300, batch_size=128, data_dir=None):
    """`digits-mlp`: a 3-layer MLP classifier on the digits; training-set
    cross-entropy (the loss the optimizer minimises, over all 1797 images)."""
    x, y = digits_images(data_dir)
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

    return Task(
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
