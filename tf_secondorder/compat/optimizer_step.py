"""The optimizer step of Keras 3.15's TensorFlow backend, in our own terms.

Keras (``keras/src/backend/tensorflow/optimizer.py``) runs one step as::

    apply()                                   # replica context
      _clip_gradients(); _apply_weight_decay(variables)
      _backend_update_step()
        _all_reduce_sum_gradients()                    # replica context
        merge_call(_distributed_tf_update_step)        # cross-replica context
          extended.update(var, update_step) for each variable
      _update_model_variables_moving_average()         # use_ema
    iterations += 1

``KerasStepHooks`` overrides those private methods so that a subclass sees two
methods of its own:

- ``reduce_gradients(grads_and_vars)`` in replica context, instead of Keras's
  all-reduce SUM (the loss is pre-scaled by 1/replicas, so the sum is the mean);
- ``apply_reduced_gradients(strategy, grads_and_vars, learning_rate)`` in
  cross-replica context, once per step, instead of Keras's per-variable loop.

Decoupled weight decay and the EMA update move inside that step so that a
step the subclass skips (non-finite gradients) is skipped whole: Keras would
apply the decay before the reduction and update the EMA after it.
``keras_sum``, ``keras_update_variables`` and ``keras_weight_decay`` give the
subclass Keras's own behaviour to call.

If a Keras upgrade renames or stops calling a hooked method, the tests in
``tests/compat/test_keras_hooks.py`` fail (see ``compat.testing``).
"""

import keras
import tensorflow as tf
from keras.src.backend.tensorflow.optimizer import TFOptimizer
from keras.src.optimizers.base_optimizer import BaseOptimizer

from tf_secondorder.compat import testing

HOOKED_METHODS = (
    "_all_reduce_sum_gradients",
    "_distributed_tf_update_step",
    "_apply_weight_decay",
    "_update_model_variables_moving_average",
)


def keras_has_hook_points():
    """True if the installed Keras still has every method these hooks override."""
    return all(callable(getattr(TFOptimizer, m, None)) for m in HOOKED_METHODS)


class KerasStepHooks:
    """Mixin placed before a ``keras.optimizers.Optimizer`` class."""

    # -- what subclasses implement ------------------------------------------

    def reduce_gradients(self, grads_and_vars):
        return self.keras_sum(grads_and_vars)

    def apply_reduced_gradients(self, strategy, grads_and_vars, learning_rate):
        self.keras_weight_decay(strategy, [v for _, v in grads_and_vars])
        self.keras_update_variables(strategy, grads_and_vars, learning_rate)

    def step_was_skipped(self):
        """Scalar bool tensor: whether this step's update was skipped (read in
        replica context after the update; the EMA then stays)."""
        return tf.constant(False)

    # -- Keras's own behaviour ----------------------------------------------

    def keras_sum(self, grads_and_vars):
        """Keras's all-reduce SUM of the gradients (replica context)."""
        return super()._all_reduce_sum_gradients(grads_and_vars)

    def keras_update_variables(self, strategy, grads_and_vars, learning_rate):
        """``update_step`` for each variable on each replica (cross-replica)."""
        return super()._distributed_tf_update_step(
            strategy, grads_and_vars, learning_rate
        )

    def keras_weight_decay(self, strategy, variables):
        """The optimizer class's decoupled weight decay (cross-replica context).

        TFOptimizer's own only wraps BaseOptimizer's arithmetic in a
        merge_call, which cannot run from cross-replica context, so that
        arithmetic runs on each replica's own copy (replicas differ under
        local SGD). A class with a rule of its own (Muon) gets its Keras
        variables, as Keras calls it; under local SGD its decay then starts
        from the first replica's copy.
        """
        if (
            getattr(self, "weight_decay", None) is None
            and getattr(self, "adam_weight_decay", None) is None
        ):
            return
        decay = _own_weight_decay(type(self))
        if decay is not BaseOptimizer._apply_weight_decay:
            keras_variables = self._trainable_variables
            decay(
                self, [keras_variables[self._get_variable_index(v)] for v in variables]
            )
            return
        for variable in variables:
            variable = (
                variable.value if isinstance(variable, keras.Variable) else variable
            )
            strategy.extended.update(
                variable,
                tf.autograph.experimental.do_not_convert(lambda v: decay(self, [v])),
                group=False,
            )

    # -- the overrides -------------------------------------------------------

    def _all_reduce_sum_gradients(self, grads_and_vars):
        testing.record("reduce")
        return self.reduce_gradients(list(grads_and_vars))

    def _distributed_tf_update_step(self, strategy, grads_and_vars, learning_rate):
        testing.record("update")
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        return self.apply_reduced_gradients(strategy, grads_and_vars, learning_rate)

    def _apply_weight_decay(self, variables):
        # Deferred into `apply_reduced_gradients` (see the module docstring).
        testing.record("weight_decay")

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        tf.cond(
            self.step_was_skipped(),
            lambda: None,
            lambda: super(KerasStepHooks, self)._update_model_variables_moving_average(
                trainable_variables
            ),
        )


def _own_weight_decay(cls):
    for klass in cls.__mro__:
        if issubclass(klass, KerasStepHooks):
            continue
        if klass is TFOptimizer:
            break
        if "_apply_weight_decay" in vars(klass):
            return vars(klass)["_apply_weight_decay"]
    return BaseOptimizer._apply_weight_decay


def apply_in_cross_replica_context(optimizer, strategy, grads_and_vars):
    """One step of a plain Keras `optimizer` (built on the variables) from
    cross-replica context, where Keras's `apply` cannot run (it needs a
    replica context for its merge_call): Keras's per-variable update on each
    replica, then its step count. No clipping, weight decay or EMA."""
    grads_and_vars = [
        (g, v.value if isinstance(v, keras.Variable) else v) for g, v in grads_and_vars
    ]
    TFOptimizer._distributed_tf_update_step(
        optimizer, strategy, grads_and_vars, optimizer.learning_rate
    )
    optimizer.iterations.assign_add(1)
