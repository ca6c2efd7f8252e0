"""tf.distribute integration. Private Keras/TF API is confined to _keras_hooks."""

# Importing the compressor modules registers their names (compression="qsgd", ...).
from tf_secondorder.distribute import compressors, quantizers, sparsifiers  # noqa: F401
from tf_secondorder.distribute.communication import Communication  # noqa: F401
