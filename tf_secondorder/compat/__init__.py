"""Every use of Keras or TensorFlow private API in tf_secondorder, by concern.

- `optimizer_step`: the optimizer step's private methods (reduction, update,
  weight decay, EMA) turned into `reduce_gradients` / `apply_reduced_gradients`;
- `replica_state`: per-replica optimizer state, saved per replica;
- `collectives`: all_to_all through a strategy's collective launchers;
- `graph`: whether the graph being built is compiled by XLA;
- `trainer`: private attributes of models, optimizers and strategies;
- `keras_patches`: patches of Keras functions, installed only when needed;
- `testing`: counters that show the hooks are still called (off by default).

The public names below are the patches a user may install or remove by hand.
"""

from tf_secondorder.compat.keras_patches import (
    KerasSourceUnavailable,
    install_multi_worker_fit_fix,
    installed_keras_patches,
    uninstall_keras_patches,
)

__all__ = [
    "KerasSourceUnavailable",
    "install_multi_worker_fit_fix",
    "installed_keras_patches",
    "uninstall_keras_patches",
]
