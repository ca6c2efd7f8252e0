"""Benchmark tasks; their data comes through TensorFlow Datasets, never downloaded.

Each task is one module of this package that registers itself with
`registry.register` (e.g. `digits_ae`, `pydoc_language_models`); the
registry imports every module here at the first lookup, so a new task is
one new file. Shared pieces live in modules that import no task: the
registry (`registry`), the data through `tfds.load` (`data`) and models
used by several tasks (`models`).

`digits-ae`, `digits-cnn`, `digits-mlp`, `digits-logreg`, `pydoc-lm`,
`pydoc-encoder` and `pydoc-gpt2` read the TFDS datasets `sklearn_digits` and
`pydoc_topics`, which `tf_secondorder.bench.tfds_builders` builds on this
machine (from scikit-learn and CPython) the first time a task needs them.
`pydoc-gpt2` also needs keras-hub (the `hub` extra). `mnist` and `cifar10`
read TFDS's own datasets when they are already prepared in the data dir.
"""

from tf_secondorder.bench.tasks.data import (
    digits_images,
    load_tfds,
    pydoc_corpus,
    pydoc_splits,
    tfds_module,
)
from tf_secondorder.bench.tasks.registry import (
    Task,
    TaskUnavailable,
    check_name,
    default_schedule,
    descriptions,
    get_task,
    names,
    register,
)

__all__ = [
    "Task",
    "TaskUnavailable",
    "check_name",
    "default_schedule",
    "descriptions",
    "digits_images",
    "get_task",
    "load_tfds",
    "names",
    "pydoc_corpus",
    "pydoc_splits",
    "register",
    "tfds_module",
]
