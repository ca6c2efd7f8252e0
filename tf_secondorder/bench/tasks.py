"""Benchmark tasks; their data comes through TensorFlow Datasets, never downloaded.

`digits-ae`, `pydoc-lm` and `pydoc-gpt2` read the TFDS datasets
`sklearn_digits` and `pydoc_topics`, which `tf_secondorder.bench.tfds_builders`
builds on this machine (from scikit-learn and CPython) the first time a task
needs them. `pydoc-gpt2` also needs keras-hub (the `hub` extra).
`mnist` and `cifar10` read TFDS's own datasets when they are already prepared
in the data dir. Either way the path is `tfds.load(...)` -> `tf.data` ->
`model.fit`.
"""

import dataclasses
import hashlib

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
    # seed -> shuffled tf.data.Dataset of single (x, y) examples, which
    # `--batch-schedule` batches; None: the task has no such option.
    make_examples: callable = None


class TaskUnavailable(RuntimeError):
    """The task's data (or TensorFlow Datasets itself) is not on this machine."""


OFFLINE_TASKS = (
    "digits-ae",
    "pydoc-lm",
    "digits-cnn",
    "pydoc-encoder",
    "digits-mlp",
    "digits-logreg",
    "pydoc-gpt2",
)


def _cnn_and_encoder_tasks():
    # Imported on use: it imports this module.
    from tf_secondorder.bench import cnn_and_encoder_tasks

    return cnn_and_encoder_tasks


def _logistic_task():
    # Imported on use: it imports this module.
    from tf_secondorder.bench import logistic_task

    return logistic_task


def _hub_tasks():
    # Imported on use: it imports this module.
    from tf_secondorder.bench import hub_tasks

    return hub_tasks


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise TaskUnavailable(
            "the bench reads its data through TensorFlow Datasets: "
            'pip install "tf-secondorder[bench]" (or pip install '
            "tensorflow-datasets importlib_resources)"
        ) from e
    return tfds


def _offline_dataset(name, data_dir):
    """Builds the offline TFDS dataset `name` in `data_dir` if not there yet."""
    _tfds()
    from tf_secondorder.bench import tfds_builders

    return tfds_builders.prepare(data_dir, [name])[name]


def digits_images(data_dir=None):
    """(images [1797, 64] float32 in [0, 1], labels) through `tfds.load`.

    The same array as `load_digits().data / 16` in scikit-learn's order.
    """
    tfds = _tfds()
    _offline_dataset("sklearn_digits", data_dir)
    data = tfds.as_numpy(
        tfds.load(
            "sklearn_digits",
            split="train",
            data_dir=data_dir,
            download=False,
            batch_size=-1,
        )
    )
    x = data["image"].reshape(-1, 64).astype("float32") / np.float32(16.0)
    return x, data["label"].astype("int32")


def digits_autoencoder(steps=2000, data_dir=None):
    """`digits-ae`: a deep autoencoder on scikit-learn's digits (1797 x 64, scaled to [0, 1])."""
    tfds = _tfds()
    x, _ = digits_images(data_dir)
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


def pydoc_corpus():
    """The bytes of CPython's pydoc_data.topics and their sha256 (no TFDS).

    `pydoc_splits` gives the same bytes through `tfds.load`.
    """
    from tf_secondorder.bench.tfds_builders import pydoc_bytes

    data = pydoc_bytes()
    return data, hashlib.sha256(data.tobytes()).hexdigest()


def pydoc_splits(data_dir=None):
    """(train, held_out) uint8 arrays of the pydoc corpus through `tfds.load`.

    `train` is the first 90% of the bytes and `held_out` the rest.
    """
    tfds = _tfds()
    _offline_dataset("pydoc_topics", data_dir)
    splits = []
    for split in ("train", "test"):
        chunks = tfds.as_numpy(
            tfds.load("pydoc_topics", split=split, data_dir=data_dir, download=False)
        )
        ordered = sorted(chunks, key=lambda chunk: int(chunk["index"]))
        splits.append(np.concatenate([c["bytes"] for c in ordered]).astype(np.uint8))
    return tuple(splits)


def byte_transformer(
    context=128,
    d_model=128,
    heads=4,
    mlp=512,
    blocks=2,
    seed=0,
    vocabulary=256,
    causal=True,
):
    """A pre-norm byte-level Transformer (logits over 256 bytes): a language
    model with `causal`, an encoder without; `vocabulary` may add tokens
    (a mask) to the input."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((context,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, d_model)(tokens)
    positions = keras.ops.arange(context)
    x = x + keras.layers.Embedding(context, d_model)(positions)
    for _ in range(blocks):
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.MultiHeadAttention(heads, d_model // heads)(
            h, h, use_causal_mask=causal
        )
        x = x + h
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.Dense(mlp, activation="gelu")(h)
        x = x + keras.layers.Dense(d_model)(h)
    x = keras.layers.LayerNormalization()(x)
    return keras.Model(tokens, keras.layers.Dense(256)(x), name="byte_transformer")


def pydoc_language_model(
    steps=2000, context=128, batch_size=32, eval_windows=256, data_dir=None
):
    """`pydoc-lm`: byte-level Transformer LM on pydoc_data.topics; last 10% held out."""
    train, held_out = pydoc_splits(data_dir)
    data = np.concatenate([train, held_out])
    sha256 = hashlib.sha256(data.tobytes()).hexdigest()

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
            "source": "TFDS pydoc_topics (built locally)",
            "tokens_per_step": batch_size * context,
        },
    )


def _prepared_builder(name, data_dir):
    """The TFDS builder of `name` when its data is prepared in `data_dir`.

    Never downloads: the benchmark machine may be offline. Raises
    TaskUnavailable with what to do when the package or the data is missing.
    """
    try:
        tfds = _tfds()
    except TaskUnavailable as e:
        raise TaskUnavailable(
            f"task {name!r} needs TensorFlow Datasets with {name!r} prepared: "
            f"pip install tensorflow-datasets, then on a machine with network "
            f"python -c \"import tensorflow_datasets as tfds; tfds.load('{name}')\" "
            "and copy ~/tensorflow_datasets (or set TFDS_DATA_DIR). Offline "
            f"tasks: {', '.join(OFFLINE_TASKS)}."
        ) from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
        where = builder.data_dir
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        prepared, where = False, data_dir or "the TFDS data dir"
    if not prepared:
        raise TaskUnavailable(
            f"TFDS dataset {name!r} is not prepared in {str(where)!r}; run "
            f"python -c \"import tensorflow_datasets as tfds; tfds.load('{name}')\" "
            "with network access, then pass --data-dir (or set TFDS_DATA_DIR) "
            f"to where it is. Offline tasks: {', '.join(OFFLINE_TASKS)}."
        )
    return builder


def _image_pairs(name, split, data_dir):
    """`tfds.load` of an image classification split as (float image, int label)."""
    tfds = _tfds()

    def scale(image, label):
        return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)

    data = tfds.load(
        name, split=split, data_dir=data_dir, download=False, as_supervised=True
    )
    return data.map(scale, num_parallel_calls=tf.data.AUTOTUNE)


def load_tfds(name, split, data_dir=None):
    """(images, labels) NumPy arrays of a TFDS dataset already on disk.

    Images are float32 in [0, 1], labels int32. Raises TaskUnavailable, saying
    what to do, when TensorFlow Datasets or the prepared data is missing.
    """
    _prepared_builder(name, data_dir)
    images, labels = [], []
    for x, y in _image_pairs(name, split, data_dir).batch(4096).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def tfds_classifier(name, steps=2000, batch_size=128, data_dir=None):
    """A small CNN classifier on TFDS `name` (mnist, cifar10); test-set loss."""
    builder = _prepared_builder(name, data_dir)
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
        data = _image_pairs(name, "train", data_dir).cache()
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


# name -> (builder, default steps, default steps between evaluations)
TASKS = {
    "digits-ae": (digits_autoencoder, 2000, 50),
    "pydoc-lm": (pydoc_language_model, 2000, 100),
    "digits-cnn": (lambda **kw: _cnn_and_encoder_tasks().digits_cnn(**kw), 1000, 50),
    "pydoc-encoder": (
        lambda **kw: _cnn_and_encoder_tasks().pydoc_encoder(**kw),
        600,
        50,
    ),
    "digits-logreg": (
        lambda **kw: _logistic_task().digits_logistic(**kw),
        1400,
        100,
    ),
    "digits-mlp": (lambda **kw: _cnn_and_encoder_tasks().digits_mlp(**kw), 300, 25),
    "pydoc-gpt2": (lambda **kw: _hub_tasks().pydoc_gpt2(**kw), 2000, 100),
    "mnist": (lambda **kw: tfds_classifier("mnist", **kw), 2000, 100),
    "cifar10": (lambda **kw: tfds_classifier("cifar10", **kw), 2000, 100),
}


def check_name(name):
    """Raises ValueError unless `name` is a task."""
    if name not in TASKS:
        raise ValueError(f"`task` must be one of {sorted(TASKS)}; received {name!r}")


def default_schedule(name):
    """(steps, eval_every) the task uses when none are given."""
    check_name(name)
    return TASKS[name][1], TASKS[name][2]


def get_task(name, steps=None, data_dir=None):
    """The task `name` with its data loaded (through `tfds.load`).

    `data_dir` is the TFDS data dir (default: TFDS's, `TFDS_DATA_DIR` or
    `~/tensorflow_datasets`). Raises TaskUnavailable when the data is missing.
    """
    check_name(name)
    build, default_steps, _ = TASKS[name]
    return build(steps=default_steps if steps is None else steps, data_dir=data_dir)
