"""Patches of Keras functions, installed only when their situation arises.

Nothing here runs at import. Each patch is installed by an explicit call (the
optimizers make it when they meet the situation), says so once in the log,
and can be removed with `uninstall_keras_patches()`.

1. **MultiWorkerMirroredStrategy + `model.fit`** (keras-team/keras#20585).
   Keras 3.15 fails twice under a multi-worker strategy:
   `TensorFlowTrainer._maybe_symbolic_build` calls
   `strategy.reduce("MEAN", batch, axis=None)` on a distributed batch that
   only provides shapes (a local replica's batch serves as well), and
   `reduce_per_replica` reduces the step's scalar logs with `axis=0` (the
   single-worker path means the elementwise mean over replicas, `axis=None`).
   Installed when an optimizer of this package is created under such a
   strategy, or by calling `install_multi_worker_fit_fix()`; each fix only
   while Keras's source still shows its bug, and only acting when the
   model's strategy is in multi-worker mode. If the source cannot be read
   the check cannot be made and a RuntimeError says so.
2. **Automatic callbacks**: `fit`, `evaluate` and `predict` build a
   `keras.callbacks.CallbackList`; the wrapped constructor puts
   tf_secondorder's callbacks in front of the user's when the model's
   optimizer is one of this package's: `OptimizerCounters` (its counters in
   the logs, for History, CSVLogger and TensorBoard), `RootPipeline` (the
   host side of pipelined root refreshes) and, under local SGD,
   `SyncReplicas`. Installed when such an optimizer is created; logged at
   INFO, since other models' callbacks are left as they are.
"""

import inspect
import logging
import re

import keras
import tensorflow as tf

from tf_secondorder.compat import testing
from tf_secondorder.compat.trainer import in_multi_worker_mode

logger = logging.getLogger("tf_secondorder")

# name -> (owner, attribute, Keras's original)
_INSTALLED = {}


def installed_keras_patches():
    """Names of the patches in place now."""
    return sorted(_INSTALLED)


def _install(name, owner, attribute, replacement, reason, level=logging.WARNING):
    if name in _INSTALLED:
        return False
    _INSTALLED[name] = (owner, attribute, getattr(owner, attribute))
    setattr(owner, attribute, replacement)
    logger.log(
        level,
        "tf_secondorder: patched %s.%s (%s); "
        "tf_secondorder.compat.uninstall_keras_patches() removes it.",
        getattr(owner, "__name__", owner),
        attribute,
        reason,
    )
    return True


def original(name):
    """Keras's own function behind an installed patch `name`."""
    return _INSTALLED[name][2]


def uninstall_keras_patches(names=None):
    """Restores Keras's own functions (all patches, or those named)."""
    for name in list(names or _INSTALLED):
        if name in _INSTALLED:
            owner, attribute, function = _INSTALLED.pop(name)
            setattr(owner, attribute, function)


# --- 1. MultiWorkerMirroredStrategy + model.fit -----------------------------

_SYMBOLIC_BUILD_BUG = re.compile(r"distribute_strategy\.reduce\(")
_REDUCE_AXIS_BUG = re.compile(r"strategy\.reduce\(\s*\"MEAN\",\s*v,\s*axis=0\s*\)")


class KerasSourceUnavailable(RuntimeError):
    """Keras's source cannot be read, so whether it has a bug cannot be checked."""


def _trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def read_source(function):
    """`function`'s source; raises KerasSourceUnavailable when it cannot be read."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError) as error:
        raise KerasSourceUnavailable(
            f"cannot read the source of Keras's {function.__qualname__} ({error}) "
            "to check whether it still has keras-team/keras#20585. Install Keras "
            "with its .py files, or call "
            "tf_secondorder.compat.install_multi_worker_fit_fix(force=True) to "
            "install the fix without the check."
        ) from error


def symbolic_build_has_bug(source):
    """Whether `_maybe_symbolic_build`'s source reduces the sample batch."""
    return bool(_SYMBOLIC_BUILD_BUG.search(source))


def reduce_per_replica_has_bug(source):
    """Whether `reduce_per_replica`'s source reduces multi-worker logs on axis 0."""
    return bool(_REDUCE_AXIS_BUG.search(source))


def multi_worker_fixes_needed():
    """{"symbolic_build": bool, "reduce_per_replica": bool} for this Keras."""
    trainer = _trainer_module()
    build = (
        original("symbolic_build")
        if "symbolic_build" in _INSTALLED
        else trainer.TensorFlowTrainer._maybe_symbolic_build
    )
    reduce = (
        original("reduce_per_replica")
        if "reduce_per_replica" in _INSTALLED
        else trainer.reduce_per_replica
    )
    return {
        "symbolic_build": symbolic_build_has_bug(read_source(build)),
        "reduce_per_replica": reduce_per_replica_has_bug(read_source(reduce)),
    }


def _local_batch(strategy, iterator):
    for _, _, it in iterator:
        batch = next(it)
        return tf.nest.map_structure(
            lambda x: (
                strategy.experimental_local_results(x)[0]
                if isinstance(x, tf.distribute.DistributedValues)
                else x
            ),
            batch,
        )
    return None


def install_multi_worker_fit_fix(force=False):
    """Installs the fixes this Keras needs; returns the names installed now.

    With `force=True` both are installed without reading Keras's source.
    Under any strategy other than a multi-worker one, the patched functions
    run Keras's own code unchanged.
    """
    if force:
        needed = {"symbolic_build": True, "reduce_per_replica": True}
    else:
        needed = multi_worker_fixes_needed()
    trainer = _trainer_module()
    installed = []
    if needed["symbolic_build"] and "symbolic_build" not in _INSTALLED:
        keras_build = trainer.TensorFlowTrainer._maybe_symbolic_build

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            strategy = self._distribute_strategy
            if iterator is not None and in_multi_worker_mode(strategy):
                testing.record("multi_worker_build")
                data_batch, iterator = _local_batch(strategy, iterator), None
            return keras_build(self, iterator=iterator, data_batch=data_batch)

        _install(
            "symbolic_build",
            trainer.TensorFlowTrainer,
            "_maybe_symbolic_build",
            _maybe_symbolic_build,
            "keras-team/keras#20585: fit under MultiWorkerMirroredStrategy",
        )
        installed.append("symbolic_build")
    if needed["reduce_per_replica"] and "reduce_per_replica" not in _INSTALLED:
        keras_reduce = trainer.reduce_per_replica

        def reduce_per_replica(values, strategy, reduction):
            if reduction in ("auto", "mean") and in_multi_worker_mode(strategy):
                testing.record("multi_worker_reduce")
                return tf.nest.map_structure(
                    lambda v: strategy.reduce("MEAN", v, axis=None), values
                )
            return keras_reduce(values, strategy, reduction)

        _install(
            "reduce_per_replica",
            trainer,
            "reduce_per_replica",
            reduce_per_replica,
            "keras-team/keras#20585: fit logs under MultiWorkerMirroredStrategy",
        )
        installed.append("reduce_per_replica")
    return installed


def prepare_for_strategy(strategy):
    """What an optimizer created under `strategy` needs from Keras."""
    if in_multi_worker_mode(strategy):
        install_multi_worker_fit_fix()


# --- 2. Replica sync callbacks ----------------------------------------------


def install_callback_injection(callbacks_for):
    """Wraps `CallbackList.__init__` so every fit/evaluate/predict also gets
    `callbacks_for(model, callbacks)` in front of the user's. Idempotent."""
    callback_list = keras.callbacks.CallbackList
    keras_init = callback_list.__init__
    if "callback_list" in _INSTALLED:
        return

    def __init__(
        self, callbacks=None, add_history=False, add_progbar=False, model=None, **params
    ):
        keras_init(
            self,
            callbacks,
            add_history=add_history,
            add_progbar=add_progbar,
            model=model,
            **params,
        )
        if model is None:
            return
        extra = callbacks_for(model, self.callbacks)
        if extra:
            testing.record("callbacks")
        for callback in reversed(extra):
            self.callbacks.insert(0, callback)
            callback.set_model(model)
            if params:
                callback.set_params(params)

    _install(
        "callback_list",
        callback_list,
        "__init__",
        __init__,
        "tf_secondorder's callbacks for models whose optimizer is "
        "tf_secondorder's: optimizer counters in the fit logs, pipelined "
        "root refreshes, replicas averaged before evaluation and saving under "
        "local SGD",
        # It changes nothing for other models: information, not a warning.
        level=logging.INFO,
    )
