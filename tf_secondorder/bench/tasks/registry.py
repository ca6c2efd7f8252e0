"""The bench's tasks by name: `register` adds one, `get_task` builds one.

Every module of this package is imported the first time a name is looked
up (`names`, `get_task`, ...), so a task module registers itself by being
there: adding a task is one new file. This module imports nothing from the
task modules, and they import it, so there is no cycle.
"""

import dataclasses
import importlib
import pkgutil


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


@dataclasses.dataclass(frozen=True)
class Registration:
    """What the registry knows of a task before its data is loaded."""

    name: str
    build: callable  # (steps=..., data_dir=...) -> Task
    steps: int  # default number of training steps
    eval_every: int  # default steps between evaluations
    description: str  # one line, for `tf-secondorder bench --help`
    offline: bool  # True: its data is built on this machine, never downloaded


_REGISTRY = {}
_discovered = False


def register(name, *, steps, eval_every, description, offline=True):
    """Decorator: registers `build(steps=..., data_dir=...) -> Task` as `name`.

    `steps` and `eval_every` are the task's defaults, `description` the one
    line `tf-secondorder bench --help` shows, and `offline` says whether its
    data is built on this machine (False: a TFDS dataset the user prepares).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string; received {name!r}")
    if "\n" in description or not description.strip():
        raise ValueError(
            f"`description` must be one non-empty line; received {description!r}"
        )

    def decorator(build):
        known = _REGISTRY.get(name)
        if known is not None and _origin(known.build) != _origin(build):
            raise ValueError(
                f"`name` must be a task not registered yet; received {name!r}, "
                f"registered by {_origin(known.build)}"
            )
        _REGISTRY[name] = Registration(
            name, build, steps, eval_every, description, offline
        )
        return build

    return decorator


def _origin(build):
    # A module imported again (importlib.reload) registers a new function
    # object under the same name: that is the same task, not a clash.
    return f"{build.__module__}.{build.__qualname__}"


def _discover():
    """Imports every module of this package once, so that each registers its
    tasks. Task modules import the registry, never the reverse: the imports
    here are by name, at the first lookup, after every module is defined."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    _discovered = True


def registrations():
    """{name: Registration} of every task, by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def names(offline=None):
    """The task names, sorted; `offline=True`/`False`: only the tasks whose
    data is (is not) built on this machine."""
    return [
        name
        for name, entry in registrations().items()
        if offline is None or entry.offline == offline
    ]


def descriptions():
    """{name: one-line description}, sorted by name (the `--task` help)."""
    return {name: entry.description for name, entry in registrations().items()}


def check_name(name):
    """Raises ValueError unless `name` is a task."""
    if name not in registrations():
        raise ValueError(f"`task` must be one of {names()}; received {name!r}")


def default_schedule(name):
    """(steps, eval_every) the task uses when none are given."""
    check_name(name)
    entry = _REGISTRY[name]
    return entry.steps, entry.eval_every


def get_task(name, steps=None, data_dir=None):
    """The task `name` with its data loaded (through `tfds.load`).

    `data_dir` is the TFDS data dir (default: TFDS's, `TFDS_DATA_DIR` or
    `~/tensorflow_datasets`). Raises TaskUnavailable when the data is missing.
    """
    check_name(name)
    entry = _REGISTRY[name]
    return entry.build(steps=entry.steps if steps is None else steps, data_dir=data_dir)
