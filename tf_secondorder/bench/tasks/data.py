"""The tasks' data, through TensorFlow Datasets and never downloaded.

`sklearn_digits` and `pydoc_topics` are built on this machine (from
scikit-learn and CPython) by `tf_secondorder.bench.tfds_builders` the first
time a task needs them; other TFDS datasets (mnist, cifar10) are read when
already prepared in the data dir. Either way the path is `tfds.load(...)` ->
`tf.data` -> `model.fit`.

TensorFlow Datasets is an optional dependency (the `bench` extra), so it and
`tfds_builders` (which imports it) are imported inside the functions that
need them, where a missing install becomes a TaskUnavailable saying what to
install.
"""

import hashlib

import numpy as np
import tensorflow as tf

from tf_secondorder.bench.tasks.registry import TaskUnavailable, names


def tfds_module():
    """`tensorflow_datasets`, or TaskUnavailable saying how to install it."""
    try:
        import tensorflow_datasets as tfds  # optional: the `bench` extra
    except ImportError as e:
        raise TaskUnavailable(
            "the bench reads its data through TensorFlow Datasets: "
            'pip install "tf-secondorder[bench]" (or pip install '
            "tensorflow-datasets importlib_resources)"
        ) from e
    return tfds


def _offline_dataset(name, data_dir):
    """Builds the offline TFDS dataset `name` in `data_dir` if not there yet."""
    tfds_module()
    # Here, not at the top: tfds_builders imports tensorflow_datasets, which
    # tfds_module() has just found (or said how to install).
    from tf_secondorder.bench import tfds_builders

    return tfds_builders.prepare(data_dir, [name])[name]


def digits_images(data_dir=None):
    """(images [1797, 64] float32 in [0, 1], labels) through `tfds.load`.

    The same array as `load_digits().data / 16` in scikit-learn's order.
    """
    tfds = tfds_module()
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


def pydoc_corpus():
    """The bytes of CPython's pydoc_data.topics and their sha256 (no TFDS).

    `pydoc_splits` gives the same bytes through `tfds.load`.
    """
    # Here, not at the top: tfds_builders imports tensorflow_datasets, an
    # optional dependency that importing this module must not require.
    from tf_secondorder.bench.tfds_builders import pydoc_bytes

    data = pydoc_bytes()
    return data, hashlib.sha256(data.tobytes()).hexdigest()


def pydoc_splits(data_dir=None):
    """(train, held_out) uint8 arrays of the pydoc corpus through `tfds.load`.

    `train` is the first 90% of the bytes and `held_out` the rest.
    """
    tfds = tfds_module()
    _offline_dataset("pydoc_topics", data_dir)
    splits = []
    for split in ("train", "test"):
        chunks = tfds.as_numpy(
            tfds.load("pydoc_topics", split=split, data_dir=data_dir, download=False)
        )
        ordered = sorted(chunks, key=lambda chunk: int(chunk["index"]))
        splits.append(np.concatenate([c["bytes"] for c in ordered]).astype(np.uint8))
    return tuple(splits)


def prepared_builder(name, data_dir):
    """The TFDS builder of `name` when its data is prepared in `data_dir`.

    Never downloads: the benchmark machine may be offline. Raises
    TaskUnavailable with what to do when the package or the data is missing.
    """
    try:
        tfds = tfds_module()
    except TaskUnavailable as e:
        raise TaskUnavailable(
            f"task {name!r} needs TensorFlow Datasets with {name!r} prepared: "
            f"pip install tensorflow-datasets, then on a machine with network "
            f"python -c \"import tensorflow_datasets as tfds; tfds.load('{name}')\" "
            "and copy ~/tensorflow_datasets (or set TFDS_DATA_DIR). Offline "
            f"tasks: {', '.join(names(offline=True))}."
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
            f"to where it is. Offline tasks: {', '.join(names(offline=True))}."
        )
    return builder


def image_pairs(name, split, data_dir):
    """`tfds.load` of an image classification split as (float image, int label)."""
    tfds = tfds_module()

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
    prepared_builder(name, data_dir)
    images, labels = [], []
    for x, y in image_pairs(name, split, data_dir).batch(4096).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)
