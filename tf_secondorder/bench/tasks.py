"""Benchmark tasks on data that needs no download."""

import dataclasses

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class Task:
    name: str
    steps: int
    eval_every: int
    batch_size: int
    make_model: callable
    make_dataset: callable  # seed -> infinite tf.data.Dataset of (x, y) batches
    evaluate: callable  # model -> float (the loss the targets refer to)
    loss: str
    lrs: tuple = (3e-4, 1e-3, 3e-3)
    info: dict = dataclasses.field(default_factory=dict)


def digits_autoencoder(steps=2000):
    """T1: deep autoencoder on scikit-learn's digits (1797 x 64, scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0).astype("float32")
    widths = [512, 256, 128, 16, 128, 256, 512]

    def make_model(seed):
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((64,))]
        for width in widths:
            layers.append(
                keras.layers.Dense(width, activation=None if width == 16 else "tanh")
            )
        layers.append(keras.layers.Dense(64, activation="sigmoid"))
        return keras.Sequential(layers, name="digits_autoencoder")

    def make_dataset(seed, batch_size=128):
        data = tf.data.Dataset.from_tensor_slices((x, x))
        data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        return data.batch(batch_size, drop_remainder=True).repeat().prefetch(2)

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
        evaluate=evaluate,
        loss="mse",
        info={"examples": int(len(x)), "metric": "full-data MSE"},
    )


def pydoc_corpus():
    """The bytes of CPython's pydoc_data.topics and their sha256."""
    import hashlib
    from pydoc_data import topics

    text = "".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")
    return np.frombuffer(text, dtype=np.uint8), hashlib.sha256(text).hexdigest()


def byte_transformer(context=128, d_model=128, heads=4, mlp=512, blocks=2, seed=0):
    """A pre-norm byte-level Transformer language model (logits over 256 bytes)."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((context,), dtype="int32")
    x = keras.layers.Embedding(256, d_model)(tokens)
    positions = keras.ops.arange(context)
    x = x + keras.layers.Embedding(context, d_model)(positions)
    for _ in range(blocks):
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.MultiHeadAttention(heads, d_model // heads)(
            h, h, use_causal_mask=True
        )
        x = x + h
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.Dense(mlp, activation="gelu")(h)
        x = x + keras.layers.Dense(d_model)(h)
    x = keras.layers.LayerNormalization()(x)
    return keras.Model(tokens, keras.layers.Dense(256)(x), name="byte_transformer")


def pydoc_language_model(steps=2000, context=128, batch_size=32, eval_windows=256):
    """T2: byte-level Transformer LM on pydoc_data.topics; last 10% held out."""
    data, sha256 = pydoc_corpus()
    split = int(len(data) * 0.9)
    train, held_out = data[:split], data[split:]

    def make_dataset(seed, batch_size=batch_size):
        starts = tf.data.Dataset.random(seed=seed).map(
            lambda r: tf.math.floormod(r, len(train) - context - 1)
        )
        corpus = tf.constant(train.astype("int32"))

        def window(start):
            chunk = corpus[start : start + context + 1]
            return chunk[:-1], chunk[1:]

        return starts.map(window).batch(batch_size, drop_remainder=True).prefetch(2)

    rng = np.random.default_rng(1234)
    starts = rng.integers(0, len(held_out) - context - 1, size=eval_windows)
    windows = np.stack([held_out[s : s + context + 1] for s in starts]).astype("int32")
    eval_x, eval_y = tf.constant(windows[:, :-1]), windows[:, 1:]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def evaluate(model):
        logits = model.predict(eval_x, batch_size=64, verbose=0)
        return float(loss_fn(eval_y, logits))

    return Task(
        name="pydoc-lm",
        steps=steps,
        eval_every=100,
        batch_size=batch_size,
        make_model=lambda seed: byte_transformer(context=context, seed=seed),
        make_dataset=make_dataset,
        evaluate=evaluate,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        info={
            "corpus_sha256": sha256,
            "corpus_bytes": int(len(data)),
            "metric": "held-out loss (nats/byte)",
            "tokens_per_step": batch_size * context,
        },
    )


class TaskUnavailable(RuntimeError):
    """The task's data is not on this machine (TFDS tasks)."""


def load_tfds(name, split):
    """(images, labels) NumPy arrays of a TFDS dataset already on disk.

    Never downloads: the benchmark machine may be offline. Raises
    TaskUnavailable with what to do when the package or the data is missing.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise TaskUnavailable(
            f"task {name!r} needs TensorFlow Datasets with {name!r} prepared: "
            f"pip install tensorflow-datasets, then on a machine with network "
            f"python -c \"import tensorflow_datasets as tfds; tfds.load('{name}')\" "
            "and copy ~/tensorflow_datasets (or set TFDS_DATA_DIR). Offline "
            "tasks: digits-ae, pydoc-lm."
        ) from e
    builder = tfds.builder(name)
    try:
        prepared = builder.is_prepared()
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        prepared = False
    if not prepared:
        raise TaskUnavailable(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; run "
            f"python -c \"import tensorflow_datasets as tfds; tfds.load('{name}')\" "
            "with network access, or set TFDS_DATA_DIR to where it is. Offline "
            "tasks: digits-ae, pydoc-lm."
        )
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return data["image"].astype("float32") / 255.0, data["label"].astype("int32")


def tfds_classifier(name, steps=2000, batch_size=128):
    """A small CNN classifier on TFDS `name` (mnist, cifar10); test-set loss."""
    x, y = load_tfds(name, "train")
    test_x, test_y = load_tfds(name, "test")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make_model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential(
            [
                keras.Input(x.shape[1:]),
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
        data = tf.data.Dataset.from_tensor_slices((x, y))
        data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
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
            "examples": int(len(x)),
            "metric": "test cross-entropy",
            "source": "TFDS",
        },
    )


TASKS = {
    "digits-ae": digits_autoencoder,
    "pydoc-lm": pydoc_language_model,
    "mnist": lambda steps=2000: tfds_classifier("mnist", steps),
    "cifar10": lambda steps=2000: tfds_classifier("cifar10", steps),
}


def get_task(name, steps=None):
    if name not in TASKS:
        raise ValueError(
            f"`task` must be one of {sorted(TASKS)}. Received: task={name!r}"
        )
    return TASKS[name]() if steps is None else TASKS[name](steps=steps)
