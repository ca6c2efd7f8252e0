"""TensorFlow Datasets builders for the bench's offline data.

Two datasets are built on this machine with TFDS's own builder API from data
that ships with scikit-learn and CPython, so nothing is downloaded:

- `sklearn_digits`: the 1797 8x8 handwritten digits of
  `sklearn.datasets.load_digits`, pixels 0..16 as `uint8`, in scikit-learn's
  order (one `train` split).
- `pydoc_topics`: the bytes of CPython's `pydoc_data.topics` (the topics in
  sorted order, joined), cut into chunks of at most 64 KiB; `train` holds the
  first 90% of the bytes and `test` the rest, in order.

Once prepared (`prepare(data_dir)`, or on first use by the bench tasks) they
load like any other TFDS dataset:

```python
import tensorflow_datasets as tfds
import tf_secondorder.bench.tfds_builders  # registers the two builders

digits = tfds.load("sklearn_digits", split="train", data_dir=data_dir)
```

`tf-secondorder prepare-data [--data-dir DIR]` prepares both.
"""

import contextlib
import hashlib
import io
import logging
import sys

import numpy as np
import tensorflow_datasets as tfds

# Both datasets are written in generation order, so that the bench sees the
# arrays in exactly the order scikit-learn and CPython give them.
TRAIN_FRACTION = 0.9
CHUNK_BYTES = 65536


def pydoc_bytes():
    """The bytes of CPython's `pydoc_data.topics`, topics in sorted order."""
    from pydoc_data import topics

    text = "".join(topics.topics[k] for k in sorted(topics.topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def pydoc_split(data):
    """Index of the first held-out byte: the last 10% of the corpus is `test`."""
    return int(len(data) * TRAIN_FRACTION)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits (UCI optical recognition), built offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn's load_digits, in its order."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with scikit-learn
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.data.reshape(-1, 8, 8, 1).astype(np.uint8)
        for index, (image, label) in enumerate(zip(images, digits.target, strict=True)):
            yield index, {"image": image, "label": int(label)}


class PydocTopics(tfds.core.GeneratorBasedBuilder):
    """The bytes of CPython's pydoc topics, chunked, 90% train / 10% test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "pydoc_data.topics, sorted topics, 64 KiB chunks."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "index": np.int64,
                    "bytes": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                }
            ),
            homepage="https://docs.python.org/3/library/pydoc.html",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                sha256=hashlib.sha256(pydoc_bytes().tobytes()).hexdigest(),
                python=".".join(map(str, sys.version_info[:3])),
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with CPython
        data = pydoc_bytes()
        split = pydoc_split(data)
        return {
            "train": self._generate_examples(data[:split]),
            "test": self._generate_examples(data[split:]),
        }

    def _generate_examples(self, data):
        for index, start in enumerate(range(0, len(data), CHUNK_BYTES)):
            yield index, {"index": index, "bytes": data[start : start + CHUNK_BYTES]}


BUILDERS = {"sklearn_digits": SklearnDigits, "pydoc_topics": PydocTopics}


@contextlib.contextmanager
def _quiet():
    """TFDS's build output held back (its progress bars, its banner, absl's
    warning that a new dataset folder has no dataset_info.json yet): a first
    bench run prints one line per dataset instead. Yields the held-back text,
    which the caller prints if the build fails."""
    captured = io.StringIO()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield captured
    finally:
        absl.setLevel(level)


def prepare(data_dir=None, names=None, announce=True):
    """Builds the offline datasets (`names`, default all) into `data_dir`.

    `data_dir` defaults to TFDS's data dir (`TFDS_DATA_DIR` or
    `~/tensorflow_datasets`). A dataset already prepared there is reused.
    Nothing is downloaded. With `announce`, each dataset built prints one
    line (TFDS's own progress output is held back). Returns {name: builder}.
    """
    names = list(BUILDERS) if names is None else list(names)
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise ValueError(
            f"`names` must be among {sorted(BUILDERS)}; received {unknown!r}"
        )
    config = tfds.download.DownloadConfig(
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
    )
    builders = {}
    for name in names:
        with _quiet() as captured:
            builder = BUILDERS[name](data_dir=data_dir)
            built = not builder.is_prepared()
            if built:
                try:
                    builder.download_and_prepare(download_config=config)
                except OSError:
                    # Another process may have finished the same dataset first.
                    builder = BUILDERS[name](data_dir=data_dir)
                    if not builder.is_prepared():
                        print(captured.getvalue(), file=sys.stderr, end="")
                        raise
                except BaseException:
                    print(captured.getvalue(), file=sys.stderr, end="")
                    raise
        if built and announce:
            print(f"built the TFDS dataset {name} in {builder.data_dir}", flush=True)
        builders[name] = builder
    return builders
