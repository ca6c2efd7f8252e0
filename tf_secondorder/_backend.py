"""Fails the import of tf_secondorder at once unless Keras runs on TensorFlow.

The optimizers are built on TensorFlow ops, variables and tf.distribute, so
they cannot run under Keras's JAX, PyTorch, NumPy or OpenVINO backends. The
backend is read the way Keras reads it (an already imported Keras, else
`KERAS_BACKEND`, else the `backend` entry of `$KERAS_HOME/keras.json` or
`~/.keras/keras.json`, else "tensorflow") without importing Keras, so that
this message comes before the one Keras gives when, say, JAX is not
installed.
"""

import json
import os
import sys

REQUIRED = "tensorflow"


def _keras_config_path():
    if "KERAS_HOME" in os.environ:
        keras_dir = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        keras_dir = os.path.join(base, ".keras")
    return os.path.expanduser(os.path.join(keras_dir, "keras.json"))


def configured_backend():
    """(backend name, where it was read from), without importing Keras."""
    keras = sys.modules.get("keras")
    backend = getattr(getattr(keras, "config", None), "backend", None)
    if callable(backend):
        return backend(), "the imported Keras"
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "the KERAS_BACKEND environment variable"
    path = _keras_config_path()
    try:
        with open(path) as f:
            name = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        name = None
    if name:
        return name, f"the Keras config file {path}"
    return REQUIRED, "Keras's default"


def check():
    """Raises ImportError when Keras is set to a backend other than TensorFlow."""
    name, source = configured_backend()
    if name != REQUIRED:
        raise ImportError(
            "tf_secondorder needs Keras's TensorFlow backend; Keras is set to "
            f"the {name!r} backend by {source}. Set KERAS_BACKEND=tensorflow "
            "(before Keras is imported) to use tf_secondorder."
        )


check()
