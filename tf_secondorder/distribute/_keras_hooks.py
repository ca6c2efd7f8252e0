"""Every use of Keras/TensorFlow private API in tf_secondorder lives here.

Keras 3.15's TensorFlow optimizer (``keras/src/backend/tensorflow/optimizer.py``)
runs one optimizer step as::

    apply()                       # replica context: loss scale, clip, decay
      _backend_update_step()
        _all_reduce_sum_gradients()         # replica context: the collective
        merge_call(_distributed_tf_update_step)  # cross-replica context
          extended.update(var, update_step) for each variable

``StepHooks`` overrides both private methods to give optimizers extension
points in their own terms:

- ``reduce_gradients(grads_and_vars)``: replica context, replaces Keras's
  all-reduce SUM (the loss is pre-scaled by 1/N, so the sum is the mean).
  ``Communication`` compresses here.
- ``apply_update(distribution, grads_and_vars, learning_rate)``: the whole
  update of a step, once, in cross-replica context. Shampoo uses it to guard
  the step against non-finite gradients, update all statistics and refresh
  all roots before the per-variable updates.

Per-replica optimizer state (error-feedback memory, Signum momentum) lives in
``ReplicaLocalVariable``: a sync-on-read variable that TF would save as the
sum over replicas; it saves and restores every replica's own value instead.

Also here: the ``CallbackList`` wrapper that gives ``fit``/``evaluate``/
``predict`` the ``SyncReplicas`` callback under local SGD
(``install_callback_injection``); ``all_to_all`` through a strategy's
collective launchers (bidirectional compression); the training loss and
loss tracker of Keras's ``train_step`` (the micro-batched train step); the
optimizer's trainable variables and learning-rate argument.

``install_multi_worker_fit_fix`` works around two Keras 3.15 bugs that stop
``model.fit`` under MultiWorkerMirroredStrategy (keras-team/keras#20585); see
its docstring.

If a Keras upgrade renames or stops calling a hooked method, the tests in
``tests/distribute/test_keras_hooks.py`` (and, for the hooks above,
``test_averaging``, ``test_bidirectional``, ``tests/data/test_growing``)
fail: ``HOOK_CALLS`` counts calls.
"""

import collections
import inspect
import re
import warnings

import keras
import numpy as np
import tensorflow as tf

# Trace-time call counts, by hook name; read by the tests.
HOOK_CALLS = collections.Counter()

_HOOKED_METHODS = ("_distributed_tf_update_step", "_all_reduce_sum_gradients")


def keras_has_hook_points():
    """True if the installed Keras still has the methods these hooks override."""
    base = keras.optimizers.Optimizer
    return all(callable(getattr(base, m, None)) for m in _HOOKED_METHODS)


class StepHooks:
    """Mixin for ``keras.optimizers.Optimizer`` subclasses (TensorFlow backend).

    ``apply_update`` is the whole update of one step in cross-replica context,
    after the gradients are reduced; by default it is Keras's per-variable
    loop (``update_variables``), which subclasses wrap with work that spans
    all variables.
    """

    def reduce_gradients(self, grads_and_vars):
        """Sums gradients over replicas (replica context); Keras's all-reduce."""
        return super()._all_reduce_sum_gradients(grads_and_vars)

    def step_update(self, distribution, grads_and_vars, learning_rate):
        """The step in cross-replica context; local SGD wraps `apply_update` here."""
        return self.apply_update(distribution, grads_and_vars, learning_rate)

    def apply_update(self, distribution, grads_and_vars, learning_rate):
        self.update_variables(distribution, grads_and_vars, learning_rate)

    def update_variables(self, distribution, grads_and_vars, learning_rate):
        """Keras's loop: ``update_step`` for each variable, on each replica."""
        return super()._distributed_tf_update_step(
            distribution, grads_and_vars, learning_rate
        )

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        HOOK_CALLS["update"] += 1
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        return self.step_update(distribution, grads_and_vars, learning_rate)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        HOOK_CALLS["reduce"] += 1
        return self.reduce_gradients(grads_and_vars)


def optimizer_strategy(optimizer):
    """The tf.distribute strategy the optimizer was created under."""
    return optimizer._distribution_strategy


def learning_rate_argument(optimizer):
    """What was passed as `learning_rate`: a schedule or callable as such
    (so it need not be registered to be copied), else None."""
    value = getattr(optimizer, "_learning_rate", None)
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule) or (
        callable(value) and not isinstance(value, keras.Variable)
    ):
        return value
    return None


def optimizer_trainable_variables(optimizer):
    """The model variables the optimizer was built for, in `build`'s order."""
    return optimizer._trainable_variables


def component_values(variable):
    """The per-device tf.Variables behind a (mirrored) variable, local replicas."""
    return _components(variable)


def _components(variable):
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return tuple(getattr(value, "values", None) or (value,))


def _first_local_replica(strategy, local_count):
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = getattr(resolver, "task_id", None) or 0
    return task_id * local_count


class ReplicaLocalVariable(keras.Variable):
    """A keras.Variable with one value per replica, saved per replica.

    Read and assigned in replica context, each replica sees its own value;
    read in cross-replica context it is the sum. Checkpoints and `.keras`
    files hold the values of the local replicas stacked on a new first axis;
    restoring with a different replica count gives every replica the mean.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, synchronization="on_read", aggregation="sum", **kwargs)

    def replica_values(self):
        """[local replicas, *shape] NumPy array."""
        return np.stack([np.asarray(c.numpy()) for c in _components(self)])

    def _stacked(self):
        return tf.stack([tf.convert_to_tensor(c) for c in _components(self)])

    def assign_replica_values(self, stacked):
        components = _components(self)
        rows = tf.convert_to_tensor(stacked, dtype=self.dtype)
        strategy = getattr(self.value, "distribute_strategy", None)
        total = strategy.num_replicas_in_sync if strategy is not None else 1
        if rows.shape.rank == len(self.shape):
            rows = tf.stack([rows] * len(components))
        elif rows.shape[0] == total and total != len(components):
            start = _first_local_replica(strategy, len(components))
            rows = rows[start : start + len(components)]
        elif rows.shape[0] != len(components):
            warnings.warn(
                f"{self.path}: saved for {rows.shape[0]} replicas, restored on "
                f"{len(components)}; every replica gets the mean.",
                stacklevel=2,
            )
            rows = tf.stack([tf.reduce_mean(rows, axis=0)] * len(components))
        return tf.group([c.assign(rows[i]) for i, c in enumerate(components)])

    def _serialize_to_tensors(self):
        return {"VARIABLE_VALUE": self._stacked()}

    def _restore_from_tensors(self, restored_tensors):
        return self.assign_replica_values(restored_tensors["VARIABLE_VALUE"])


def add_replica_local_variable(
    optimizer, shape, dtype, name, initializer="zeros", per_replica=True
):
    """Adds a per-replica variable to `optimizer`'s state.

    `per_replica=True` gives a ReplicaLocalVariable (values differ between
    replicas and are saved per replica); False gives a sync-on-read variable
    whose replicas hold equal values and which saves replica 0's (counters
    updated in replica context without a merge_call).
    """
    if isinstance(initializer, str):
        initializer = keras.initializers.get(initializer)
    with optimizer._distribution_strategy.scope():
        with keras.name_scope(optimizer.name, caller=optimizer):
            if per_replica:
                variable = ReplicaLocalVariable(
                    initializer=initializer,
                    shape=shape,
                    dtype=dtype,
                    trainable=False,
                    name=name,
                )
            else:
                variable = keras.Variable(
                    initializer=initializer,
                    shape=shape,
                    dtype=dtype,
                    trainable=False,
                    name=name,
                    synchronization="on_read",
                    aggregation="only_first_replica",
                )
    optimizer._track_variable(variable)
    return variable


def all_to_all(context, tensor):
    """Row j of `tensor` ([replicas, ...]) goes to replica j; row i of the
    result came from replica i. Replica context.

    tf.distribute has no all_to_all; MirroredStrategy and
    MultiWorkerMirroredStrategy run their collectives through per-device
    launchers of `CollectiveAllReduce`, whose group and instance keys this
    uses for TensorFlow's CollectiveAllToAllV2 kernel. Returns None when the
    strategy has no such launchers (the caller then emulates it).
    """
    from tensorflow.python.ops import collective_ops

    strategy = context.strategy
    launchers = getattr(
        getattr(strategy.extended, "_cross_device_ops", None), "_launchers", None
    )
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    if not launchers or replica is None:
        return None
    launcher = launchers[int(replica) - _first_local_replica(strategy, len(launchers))]
    HOOK_CALLS["all_to_all"] += 1
    with tf.device(launcher._device):
        return collective_ops.all_to_all_v2(
            tensor,
            launcher._group_size,
            launcher._group_key,
            launcher._next_instance_key(),
            ordering_token=launcher._get_ordering_token(),
        )


def compute_training_loss(model, x, y, y_pred, sample_weight):
    """What Keras's TensorFlow `train_step` computes as the loss (compiled
    losses, the model's own losses, pre-scaled by 1/replicas)."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def track_training_loss(model, loss, count):
    """Adds `loss` of `count` examples to the "loss" `fit` logs, as Keras does."""
    from keras.src.losses import loss as loss_module

    HOOK_CALLS["loss_tracker"] += 1
    model._loss_tracker.update_state(
        loss_module.unscale_loss_for_distribution(loss), sample_weight=count
    )


# --- Callbacks every fit/evaluate/predict gets ------------------------------
#
# Local SGD leaves the replicas' weights different between averages; anything
# that reads them outside a train step must see the average. Keras builds a
# ``CallbackList`` for every ``fit``, ``evaluate`` and ``predict``; wrapping its
# constructor adds ``SyncReplicas`` in front of the user's callbacks (so
# checkpoints written in ``on_epoch_end`` see averaged weights) whenever the
# model's optimizer averages. Nothing changes for any other model.


def install_callback_injection():
    """Idempotent; the callbacks come from `callbacks.sync.automatic_callbacks`."""
    if "callback_list_init" in _ORIGINALS:
        return
    original = keras.callbacks.CallbackList.__init__
    _ORIGINALS["callback_list_init"] = original

    def __init__(
        self, callbacks=None, add_history=False, add_progbar=False, model=None, **params
    ):
        original(
            self,
            callbacks,
            add_history=add_history,
            add_progbar=add_progbar,
            model=model,
            **params,
        )
        if model is None:
            return
        from tf_secondorder.callbacks.sync import automatic_callbacks

        extra = automatic_callbacks(model, self.callbacks)
        if extra:
            HOOK_CALLS["callbacks"] += 1
        for callback in reversed(extra):
            self.callbacks.insert(0, callback)
            callback.set_model(model)
            if params:
                callback.set_params(params)

    keras.callbacks.CallbackList.__init__ = __init__


def uninstall_callback_injection():
    """Restores Keras's own CallbackList constructor (for tests)."""
    if "callback_list_init" in _ORIGINALS:
        keras.callbacks.CallbackList.__init__ = _ORIGINALS.pop("callback_list_init")


# --- MultiWorkerMirroredStrategy + model.fit (keras-team/keras#20585) -------
#
# Keras 3.15.1 fails twice under a multi-worker strategy:
# 1. ``TensorFlowTrainer._maybe_symbolic_build`` takes one distributed batch
#    to build the model and calls ``strategy.reduce("MEAN", batch, axis=None)``
#    on it, which MultiWorkerMirroredStrategy cannot do eagerly. The batch only
#    provides shapes, so a local replica's batch serves as well.
# 2. ``reduce_per_replica`` reduces the step's logs (scalars) with
#    ``strategy.reduce("MEAN", v, axis=0)``: axis 0 does not exist on a
#    scalar and would average over the batch for anything else. Keras's
#    single-worker path means the elementwise mean over replicas, i.e.
#    ``axis=None``.
# Each fix is installed only while the installed Keras source still shows the
# bug, and acts only when the model's strategy is in multi-worker mode.

_SYMBOLIC_BUILD_BUG = re.compile(r"distribute_strategy\.reduce\(")
_REDUCE_AXIS_BUG = re.compile(r"strategy\.reduce\(\s*\"MEAN\",\s*v,\s*axis=0\s*\)")
_ORIGINALS = {}


def _trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def _source(function):
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return None


def symbolic_build_has_bug(source):
    """Whether `_maybe_symbolic_build`'s source reduces the sample batch."""
    return bool(source) and bool(_SYMBOLIC_BUILD_BUG.search(source))


def reduce_per_replica_has_bug(source):
    """Whether `reduce_per_replica`'s source reduces multi-worker logs on axis 0."""
    return bool(source) and bool(_REDUCE_AXIS_BUG.search(source))


def in_multi_worker_mode(strategy):
    """True for a MultiWorkerMirroredStrategy with more than one worker."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def multi_worker_fixes_needed():
    """{"symbolic_build": bool, "reduce_per_replica": bool} for this Keras."""
    trainer = _trainer_module()
    build = _ORIGINALS.get(
        "symbolic_build", trainer.TensorFlowTrainer._maybe_symbolic_build
    )
    reduce = _ORIGINALS.get("reduce_per_replica", trainer.reduce_per_replica)
    return {
        "symbolic_build": symbolic_build_has_bug(_source(build)),
        "reduce_per_replica": reduce_per_replica_has_bug(_source(reduce)),
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


def install_multi_worker_fit_fix():
    """Patches what `multi_worker_fixes_needed()` reports; returns what it patched.

    Idempotent. Under any other strategy the patched functions run Keras's
    own code unchanged.
    """
    trainer = _trainer_module()
    needed = multi_worker_fixes_needed()
    installed = []
    if needed["symbolic_build"]:
        original = _ORIGINALS.setdefault(
            "symbolic_build", trainer.TensorFlowTrainer._maybe_symbolic_build
        )

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            strategy = self._distribute_strategy
            if iterator is not None and in_multi_worker_mode(strategy):
                HOOK_CALLS["multi_worker_build"] += 1
                data_batch, iterator = _local_batch(strategy, iterator), None
            return original(self, iterator=iterator, data_batch=data_batch)

        trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
        installed.append("symbolic_build")
    if needed["reduce_per_replica"]:
        original_reduce = _ORIGINALS.setdefault(
            "reduce_per_replica", trainer.reduce_per_replica
        )

        def reduce_per_replica(values, strategy, reduction):
            if reduction in ("auto", "mean") and in_multi_worker_mode(strategy):
                HOOK_CALLS["multi_worker_reduce"] += 1
                return tf.nest.map_structure(
                    lambda v: strategy.reduce("MEAN", v, axis=None), values
                )
            return original_reduce(values, strategy, reduction)

        trainer.reduce_per_replica = reduce_per_replica
        installed.append("reduce_per_replica")
    return installed


def uninstall_multi_worker_fit_fix():
    """Restores Keras's own functions (for tests)."""
    trainer = _trainer_module()
    if "symbolic_build" in _ORIGINALS:
        trainer.TensorFlowTrainer._maybe_symbolic_build = _ORIGINALS.pop(
            "symbolic_build"
        )
    if "reduce_per_replica" in _ORIGINALS:
        trainer.reduce_per_replica = _ORIGINALS.pop("reduce_per_replica")


def worker_index(strategy):
    """This process's task index under a multi-worker strategy, else 0."""
    if not in_multi_worker_mode(strategy):
        return 0
    return int(strategy.cluster_resolver.task_id or 0)


def set_initial_epoch(model, epoch):
    """Makes the next `fit` start at `epoch` (what Keras's BackupAndRestore does)."""
    model._initial_epoch = int(epoch)
