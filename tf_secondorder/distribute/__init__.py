"""tf.distribute integration. Private Keras/TF API is confined to _keras_hooks."""

# Importing the compressor modules registers their names (compression="qsgd", ...).
from tf_secondorder.distribute import compressors, quantizers, sparsifiers  # noqa: F401
from tf_secondorder.distribute._keras_hooks import (  # noqa: E402
    install_multi_worker_fit_fix as _install_multi_worker_fit_fix,
)
from tf_secondorder.distribute.communication import Communication  # noqa: F401

_install_multi_worker_fit_fix()
