"""Where the op being built will run (private TensorFlow API)."""

import tensorflow as tf

try:
    from tensorflow.python.ops import control_flow_util as _control_flow_util
except ImportError as exc:  # pragma: no cover - depends on the TF release
    _control_flow_util = None
    _IMPORT_ERROR = exc


def in_xla_context():
    """Whether ops built now are compiled by XLA: inside
    `tf.function(jit_compile=True)` (Keras's `jit_compile=True`), a TPU
    replica or a branch of either. Ops XLA cannot compile (`tf.timestamp`)
    must be left out there."""
    if _control_flow_util is None:
        raise RuntimeError(
            "tf_secondorder cannot tell whether it is inside an XLA-compiled "
            f"function with TensorFlow {tf.__version__}: {_IMPORT_ERROR}"
        )
    graph = tf.compat.v1.get_default_graph()
    return bool(_control_flow_util.GraphOrParentsInXlaContext(graph))
