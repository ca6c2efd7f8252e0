"""`tfso.distributed(optimizer, ...)`: communication options for any Keras optimizer.

`distributed` returns an instance of `Distributed<Name>`, a subclass of the
optimizer's own class with `CommunicatingOptimizer` in front, built from the
optimizer's config; the result is still an `Adam` (or `SGD`, `Muon`, ...) for
Keras and for `isinstance`. The subclass is registered as
`"tf_secondorder>Distributed<Name>"`; those of every optimizer in
`keras.optimizers` exist as soon as tf_secondorder is imported, so saved
models load in a fresh process. For a custom optimizer class, call
`distributed_class(MyOptimizer)` before loading.
"""

import inspect
import warnings

import keras

from tf_secondorder import validation
from tf_secondorder.compat import trainer
from tf_secondorder.distribute.config import OPTION_NAMES
from tf_secondorder.optimizers.base import CommunicatingOptimizer

_CLASSES = {}
# Keras optimizers that wrap others: wrap their inner optimizers instead.
_WRAPPERS = ("LossScaleOptimizer", "MultiOptimizer", "OptimizerMap")


def distributed_class(optimizer_class):
    """The (cached, registered) communicating subclass of `optimizer_class`."""
    if not (
        isinstance(optimizer_class, type)
        and issubclass(optimizer_class, keras.optimizers.Optimizer)
    ):
        validation.fail(
            "optimizer", "a keras.optimizers.Optimizer class", optimizer_class
        )
    if issubclass(optimizer_class, CommunicatingOptimizer):
        return optimizer_class
    if optimizer_class not in _CLASSES:
        name = f"Distributed{optimizer_class.__name__}"
        cls = type(
            name,
            (CommunicatingOptimizer, optimizer_class),
            {
                "__module__": __name__,
                "__doc__": f"{optimizer_class.__name__} with tf_secondorder's "
                "communication options (tfso.distribute.CommunicationConfig).",
            },
        )
        _CLASSES[optimizer_class] = keras.saving.register_keras_serializable(
            package="tf_secondorder", name=name
        )(cls)
    return _CLASSES[optimizer_class]


def distributed(optimizer, **options):
    """`optimizer` (an instance or a name such as "adam") with communication options.

    Args:
        optimizer: an unbuilt `keras.optimizers.Optimizer` instance or identifier.
        **options: the fields of `tfso.distribute.CommunicationConfig`:
            `compression`, `error_feedback`, `aggregation`, `average_every`,
            `average_warmup_steps`, `saddle_escape`.

    Returns:
        A new, unbuilt optimizer with the same configuration.
    """
    if isinstance(optimizer, (str, dict)):
        optimizer = keras.optimizers.get(optimizer)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        validation.fail(
            "optimizer", "a keras.optimizers.Optimizer instance or name", optimizer
        )
    if optimizer.built:
        validation.fail(
            "optimizer",
            "an optimizer not built yet (wrap it before compiling)",
            optimizer,
        )
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        validation.fail(
            unknown[0], f"one of the options {list(OPTION_NAMES)}", options[unknown[0]]
        )
    config = {k: v for k, v in optimizer.get_config().items() if k not in OPTION_NAMES}
    schedule = trainer.learning_rate_argument(optimizer)
    if schedule is not None:
        config["learning_rate"] = schedule  # unregistered schedules too
    wrapped = distributed_class(type(optimizer)).from_config({**config, **options})
    _warn_if_adaptive_with_biased_compression(optimizer, wrapped.communication)
    return wrapped


# Optimizers that divide by a running second moment of the gradients.
_ADAPTIVE = tuple(
    getattr(keras.optimizers, name)
    for name in (
        "Adam",
        "AdamW",
        "Adamax",
        "Nadam",
        "Adagrad",
        "Adadelta",
        "RMSprop",
        "Adafactor",
        "Lamb",
    )
    if hasattr(keras.optimizers, name)
)


def _warn_if_adaptive_with_biased_compression(optimizer, config):
    """Error feedback feeds an adaptive optimizer's second moment bursts of
    delayed gradient, and a vote feeds it signs, so its per-element scaling
    follows the compressor's error rather than the gradient's; 1-bit Adam,
    which freezes the second moment and compresses the momentum, does not
    have that problem (docs/benchmarks.md has the losses)."""
    compression = config.compression
    biased = compression is not None and (
        config.uses_error_feedback or config.aggregation == "majority_vote"
    )
    if not biased or not isinstance(optimizer, _ADAPTIVE):
        return
    if getattr(optimizer, "amsgrad", False):
        return
    warnings.warn(
        f"{type(optimizer).__name__} with compression={compression!r} "
        f"(aggregation={config.aggregation!r}, error feedback "
        f"{'on' if config.uses_error_feedback else 'off'}) trains much worse "
        "than uncompressed: the compressor's error reaches the second moment. "
        "Use tfso.OneBitAdam (Adam whose compressed exchange is of the "
        "momentum, with the variance frozen), an unbiased compressor "
        "('int8', 'qsgd', 'natural', 'fp16', 'bf16'), or tfso.SignSGD for a "
        "sign method. See the user guide, 'Choosing a compressor'.",
        UserWarning,
        stacklevel=3,
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
