"""Every use of Keras/TensorFlow private API in tf_secondorder lives here.

Keras 3.15's TensorFlow optimizer (``keras/src/backend/tensorflow/optimizer.py``)
runs one optimizer step as::

    apply()                       # replica context: loss scale, clip, decay
      _backend_update_step()
        _all_reduce_sum_gradients()         # replica context: the collective
        merge_call(_distributed_tf_update_step)  # cross-replica context
          extended.update(var, update_step) for each variable

``StepHooks`` overrides ``_distributed_tf_update_step`` to give optimizers an
extension point in their own terms, ``apply_update(distribution,
grads_and_vars, learning_rate)``: the whole update of a step, once, in
cross-replica context. Shampoo uses it to guard the step against non-finite
gradients, update all statistics and refresh all roots before the
per-variable updates.

If a Keras upgrade renames or stops calling the hooked method, the test
``tests/distribute/test_keras_hooks.py`` fails: ``HOOK_CALLS`` counts calls.
"""

import collections

import keras

# Trace-time call counts, by hook name; read by the tests.
HOOK_CALLS = collections.Counter()

_HOOKED_METHOD = "_distributed_tf_update_step"


def keras_has_hook_points():
    """True if the installed Keras still has the methods these hooks override."""
    base = keras.optimizers.Optimizer
    return callable(getattr(base, _HOOKED_METHOD, None))


class StepHooks:
    """Mixin for ``keras.optimizers.Optimizer`` subclasses (TensorFlow backend).

    ``apply_update`` is the whole update of one step in cross-replica context,
    after the gradients are reduced; by default it is Keras's per-variable
    loop (``update_variables``), which subclasses wrap with work that spans
    all variables.
    """

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
        return self.apply_update(distribution, grads_and_vars, learning_rate)
