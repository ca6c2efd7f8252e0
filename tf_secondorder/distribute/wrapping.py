"""`tfso.distributed(optimizer, ...)`: communication options for any Keras optimizer.

`distributed` returns an instance of a subclass of the optimizer's own class
with the `Communication` mixin in front, built from the optimizer's config,
so the result is still an `Adam` (or `SGD`, `Muon`, ...) for Keras and for
`isinstance`. The subclass is registered as
`"tf_secondorder>Distributed<Name>"`; the subclasses of every optimizer in
`keras.optimizers` exist as soon as tf_secondorder is imported, so saved
models load in a fresh process. For a custom optimizer class, call
`distributed_class(MyOptimizer)` before loading.
"""

import inspect

import keras

from tf_secondorder.distribute._keras_hooks import learning_rate_argument
from tf_secondorder.distribute.communication import Communication

_CLASSES = {}
_OPTIONS = (
    "compression",
    "error_feedback",
    "aggregation",
    "average_every",
    "average_warmup_steps",
    "saddle_escape",
)
# Keras optimizers that wrap others: wrap their inner optimizers instead.
_WRAPPERS = ("LossScaleOptimizer", "MultiOptimizer", "OptimizerMap")


def _build(self, var_list):
    if self.built:
        return
    self._base_class.build(self, var_list)
    self.build_communication(var_list)


def distributed_class(optimizer_class):
    """The (cached, registered) Communication subclass of `optimizer_class`."""
    if not (
        isinstance(optimizer_class, type)
        and issubclass(optimizer_class, keras.optimizers.Optimizer)
    ):
        raise ValueError(
            "`optimizer` must be a keras.optimizers.Optimizer. "
            f"Received: optimizer={optimizer_class!r}"
        )
    if issubclass(optimizer_class, Communication):
        return optimizer_class
    if optimizer_class in _CLASSES:
        return _CLASSES[optimizer_class]
    base = optimizer_class

    def __init__(
        self,
        compression=None,
        error_feedback=None,
        aggregation="mean",
        average_every=None,
        average_warmup_steps=0,
        saddle_escape=None,
        **config,
    ):
        base.__init__(self, **config)
        self._init_communication(
            compression,
            error_feedback,
            aggregation,
            average_every,
            average_warmup_steps,
            saddle_escape,
        )

    def get_config(self):
        return {**base.get_config(self), **self.communication_config()}

    name = f"Distributed{base.__name__}"
    cls = type(
        name,
        (Communication, base),
        {
            "__init__": __init__,
            "build": _build,
            "get_config": get_config,
            "_base_class": base,
            "__module__": __name__,
            "__doc__": f"{base.__name__} with tf_secondorder's communication options.",
        },
    )
    cls = keras.saving.register_keras_serializable(package="tf_secondorder", name=name)(
        cls
    )
    _CLASSES[optimizer_class] = cls
    return cls


def distributed(
    optimizer,
    compression=None,
    error_feedback=None,
    aggregation="mean",
    average_every=None,
    average_warmup_steps=0,
    saddle_escape=None,
):
    """`optimizer` (an instance or a name such as "adam") with communication options.

    Args:
        optimizer: a `keras.optimizers.Optimizer` instance or identifier.
        compression: `None`, a compressor name (see `tfso.compression.names()`)
            or a `tfso.compression.Compressor`.
        error_feedback: `None` (on for biased compressors), `True`, `False`.
        aggregation: `"mean"`, `"majority_vote"` (sign compressors only) or
            `"bidirectional"` (the mean compressed again on its way back,
            with worker and server memories; O(d) bytes at any N).
        average_every: `None`, or I >= 1 for local SGD: replicas step on
            their own gradients and average weights and slots every I steps.
        average_warmup_steps: synchronous steps before local SGD starts.
        saddle_escape: `None` or a `tfso.SaddleEscape`: a random
            perturbation when the gradient norm is small (SPEC §4.7).

    Returns:
        A new, unbuilt optimizer with the same configuration.
    """
    if isinstance(optimizer, (str, dict)):
        optimizer = keras.optimizers.get(optimizer)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "`optimizer` must be a keras.optimizers.Optimizer instance or name. "
            f"Received: optimizer={optimizer!r}"
        )
    if optimizer.built:
        raise ValueError(
            "`optimizer` must not be built yet: wrap it before compiling the model."
        )
    config = {k: v for k, v in optimizer.get_config().items() if k not in _OPTIONS}
    schedule = learning_rate_argument(optimizer)
    if schedule is not None:
        config["learning_rate"] = schedule  # unregistered schedules too
    cls = distributed_class(type(optimizer))
    return cls.from_config(
        {
            **config,
            "compression": compression,
            "error_feedback": error_feedback,
            "aggregation": aggregation,
            "average_every": average_every,
            "average_warmup_steps": average_warmup_steps,
            "saddle_escape": saddle_escape,
        }
    )


def _register_builtin_optimizers():
    for value in vars(keras.optimizers).values():
        if (
            inspect.isclass(value)
            and issubclass(value, keras.optimizers.Optimizer)
            and value is not keras.optimizers.Optimizer
            and not getattr(value, "__abstractmethods__", None)
            and value.__name__ not in _WRAPPERS
        ):
            distributed_class(value)


_register_builtin_optimizers()
