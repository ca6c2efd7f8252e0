"""The bench's data through TensorFlow Datasets, built in a temporary data dir.

Nothing here downloads: `sklearn_digits` and `pydoc_topics` are built from
scikit-learn and CPython, and a stand-in `mnist` (TFDS's features and
version, random pixels) is written with TFDS's own builder API.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

tfds = pytest.importorskip("tensorflow_datasets")

from tf_secondorder import cli  # noqa: E402
from tf_secondorder.bench import tasks, tfds_builders  # noqa: E402


def test_offline_datasets_hold_exactly_the_source_arrays(data_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = tasks.digits_images(data_dir)
    assert x.dtype == np.float32 and x.shape == (1797, 64)
    np.testing.assert_array_equal(x, (digits.data / 16.0).astype("float32"))
    np.testing.assert_array_equal(y, digits.target)

    train, held_out = tasks.pydoc_splits(data_dir)
    corpus, sha256 = tasks.pydoc_corpus()
    split = int(len(corpus) * 0.9)
    np.testing.assert_array_equal(train, corpus[:split])
    np.testing.assert_array_equal(held_out, corpus[split:])
    builder = tfds.builder("pydoc_topics", data_dir=data_dir)
    assert builder.info.metadata["sha256"] == sha256


def test_prepare_reuses_what_is_there(data_dir):
    builders = tfds_builders.prepare(data_dir)
    assert sorted(builders) == ["pydoc_topics", "sklearn_digits"]
    assert all(b.is_prepared() for b in builders.values())
    with pytest.raises(ValueError, match="`names` must be among"):
        tfds_builders.prepare(data_dir, ["digits"])


def test_a_first_build_prints_one_line_per_dataset(tmp_path, capfd):
    tfds_builders.prepare(str(tmp_path))
    out, err = capfd.readouterr()
    assert out.splitlines() == [
        f"built the TFDS dataset {name} in {tmp_path}/{name}/1.0.0"
        for name in ("sklearn_digits", "pydoc_topics")
    ]
    # TFDS's progress bars, banner and absl's warnings are held back.
    assert "WARNING" not in err and "%|" not in err, err
    tfds_builders.prepare(str(tmp_path))  # prepared: nothing to say
    assert capfd.readouterr().out == ""


def test_prepare_data_command(tmp_path, capsys):
    assert cli.main(["prepare-data", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"sklearn_digits: {tmp_path}" in out and "pydoc_topics" in out
    labels = tfds.load(
        "sklearn_digits", split="train[:5]", data_dir=str(tmp_path), download=False
    )
    assert [int(e["label"]) for e in labels] == [0, 1, 2, 3, 4]


def test_digits_task_batches_are_those_of_the_in_memory_pipeline(data_dir):
    """The TFDS pipeline gives the batches the bench gave before, in order."""
    from sklearn.datasets import load_digits

    task = tasks.get_task("digits-ae", steps=100, data_dir=data_dir)
    assert task.info["examples"] == 1797
    x = (load_digits().data / 16.0).astype("float32")
    # 16 batches of 128 cover more than one pass over the 1797 examples.
    reference = (
        tf.data.Dataset.from_tensor_slices((x, x))
        .shuffle(len(x), seed=3, reshuffle_each_iteration=True)
        .batch(128, drop_remainder=True)
        .repeat()
    )
    for (a, b), (c, d) in zip(
        task.make_dataset(3).take(16), reference.take(16), strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), c.numpy())
        np.testing.assert_array_equal(b.numpy(), d.numpy())


def test_pydoc_task_reads_the_corpus_through_tfds(data_dir):
    task = tasks.get_task("pydoc-lm", steps=100, data_dir=data_dir)
    _, sha256 = tasks.pydoc_corpus()
    assert task.info["corpus_sha256"] == sha256
    x, y = next(iter(task.make_dataset(0)))
    assert x.shape == (32, 128) and y.shape == (32, 128)
    np.testing.assert_array_equal(x.numpy()[:, 1:], y.numpy()[:, :-1])


def test_tfds_load_feeds_model_fit(data_dir):
    import tf_secondorder as tfso

    data = tfds.load(
        "sklearn_digits",
        split="train",
        data_dir=data_dir,
        download=False,
        as_supervised=True,
    )
    data = (
        data.map(lambda image, label: (tf.cast(image, tf.float32) / 16.0, label))
        .batch(64, drop_remainder=True)
        .take(8)
    )
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=tfso.Shampoo(3e-3, precondition_frequency=4, block_size=64),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(data, epochs=3, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # What the bench reports as state/weights: Shampoo keeps more than Adam's 2.
    from tf_secondorder.bench import runner

    state = runner.variable_bytes(model.optimizer.variables)
    assert state > 2 * runner.variable_bytes(model.trainable_variables)


class FakeMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS's `mnist` (same name, version and features), random pixels.

    Written into a temporary data dir, it is read back by TFDS's own `mnist`
    builder, as a prepared MNIST would be.
    """

    name = "mnist"
    VERSION = tfds.core.Version("3.0.1")
    SIZES = {"train": 256, "test": 64}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {
            split: self._generate_examples(split, size)
            for split, size in self.SIZES.items()
        }

    def _generate_examples(self, split, size):
        rng = np.random.default_rng(0 if split == "train" else 1)
        for index in range(size):
            image = rng.integers(0, 256, size=(28, 28, 1), dtype=np.uint8)
            image[0, 0, 0] = index  # to find each example after TFDS's shuffle
            yield index, {"image": image, "label": index % 10}


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds_mnist"))
    FakeMnist(data_dir=path).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return path


def test_mnist_prepared_in_the_data_dir_loads_through_tfds(mnist_dir):
    # TFDS's registered mnist builder, not the stand-in, reads the files.
    assert type(tfds.builder("mnist", data_dir=mnist_dir)) is not FakeMnist
    x, y = tasks.load_tfds("mnist", "train", data_dir=mnist_dir)
    assert x.shape == (256, 28, 28, 1) and x.dtype == np.float32
    assert y.dtype == np.int32 and 0.0 <= x.min() and x.max() <= 1.0
    order = np.argsort(np.rint(x[:, 0, 0, 0] * 255).astype(int))
    np.testing.assert_array_equal(y[order], np.arange(256) % 10)


def test_mnist_task_trains_through_tfds_load(mnist_dir, tmp_path, capsys):
    code = cli.main(
        [
            "bench",
            "--task",
            "mnist",
            "--data-dir",
            mnist_dir,
            "--optimizers",
            "adam",
            "--lrs",
            "1e-3",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--verbose",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["task"] == "mnist" and report["task_info"]["examples"] == 256
    assert [s for s, _ in report["runs"][0]["curve"]] == [2, 4]


def test_mnist_without_data_exits_2_with_instructions(tmp_path, capsys):
    code = cli.console(
        ["bench", "--task", "mnist", "--data-dir", str(tmp_path), "--steps", "10"]
    )
    assert code == 2
    message = capsys.readouterr().err
    assert "mnist" in message and "tfds.load('mnist')" in message
    assert "digits-ae" in message  # the offline alternatives
