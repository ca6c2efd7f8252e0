"""Every use of Keras/TensorFlow private API in tf_secondorder lives here.

Keras 3.15's TensorFlow optimizer (``keras/src/backend/tensorflow/optimizer.py``)
runs one optimizer step as::

    apply()                       # replica context: loss scale, clip, decay
      _backend_update_step()
        _all_reduce_sum_gradients()         # replica context: the collective
        merge_call(_distributed_tf_update_step)  # cross-replica context
          extended.update(var, update_step) for each variable

``StepHooks`` overrides ``_distributed_tf_update_step`` to give optimizers a
public-looking extension point, ``before_update_steps(distribution,
grads_and_vars)``, that runs once per step in cross-replica context after the
gradients are reduced and before any variable is updated. Shampoo uses it to
update its statistics and refresh its roots for all variables at once.

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

    Subclasses override :meth:`before_update_steps`; ``update_step`` keeps its
    ordinary Keras meaning and runs after it, per variable.
    """

    def before_update_steps(self, distribution, grads_and_vars):
        """Runs once per step, cross-replica, before the per-variable updates."""

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        HOOK_CALLS["update"] += 1
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        self.before_update_steps(distribution, grads_and_vars)
        return super()._distributed_tf_update_step(
            distribution, grads_and_vars, learning_rate
        )
