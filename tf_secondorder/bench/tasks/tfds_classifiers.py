"""`mnist` and `cifar10`: a small CNN on TFDS's own datasets, read only when
already prepared in the data dir (never downloaded); test-set cross-entropy."""

import keras

from tf_secondorder.bench.tasks.data import image_pairs, load_tfds, prepared_builder
from tf_secondorder.bench.tasks.registry import Task, register


def tfds_classifier(name, steps=2000, batch_size=128, data_dir=None):
    """A small CNN classifier on TFDS `name` (mnist, cifar10); test-set loss."""
    builder = prepared_builder(name, data_dir)
    examples = builder.info.splits["train"].num_examples
    shape = builder.info.features["image"].shape
    test_x, test_y = load_tfds(name, "test", data_dir)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make_model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential(
            [
                keras.Input(shape),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(64, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10),
            ],
            name=f"{name}_cnn",
        )

    def make_dataset(seed, batch_size=batch_size):
        data = image_pairs(name, "train", data_dir).cache()
        data = data.shuffle(examples, seed=seed, reshuffle_each_iteration=True)
        return data.batch(batch_size, drop_remainder=True).repeat().prefetch(2)

    def evaluate(model):
        logits = model.predict(test_x, batch_size=1000, verbose=0)
        return float(loss_fn(test_y, logits))

    return Task(
        name=name,
        steps=steps,
        eval_every=100,
        batch_size=batch_size,
        make_model=make_model,
        make_dataset=make_dataset,
        evaluate=evaluate,
        loss=loss_fn,
        info={
            "examples": int(examples),
            "metric": "test cross-entropy",
            "source": "TFDS",
        },
    )


@register(
    "mnist",
    steps=2000,
    eval_every=100,
    offline=False,
    description="a small CNN on TFDS's mnist, prepared in the data dir",
)
def mnist(steps=2000, data_dir=None):
    return tfds_classifier("mnist", steps=steps, data_dir=data_dir)


@register(
    "cifar10",
    steps=2000,
    eval_every=100,
    offline=False,
    description="a small CNN on TFDS's cifar10, prepared in the data dir",
)
def cifar10(steps=2000, data_dir=None):
    return tfds_classifier("cifar10", steps=steps, data_dir=data_dir)
