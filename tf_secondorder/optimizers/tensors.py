"""Variables and gradients as plain tensors, for the optimizers' arithmetic."""

import tensorflow as tf

from tf_secondorder.linalg import unpack_symmetric


def compute_dtype(variable):
    """float64 for float64 models, float32 otherwise (also under mixed precision)."""
    return "float64" if variable.dtype == "float64" else "float32"


def read(variable):
    """The variable's value as a tensor (Keras variable arithmetic would round
    Python-float coefficients through floatx)."""
    return tf.convert_to_tensor(variable)


def dense(gradient, variable):
    """The gradient as a dense tensor of the variable's dtype and static shape
    (embedding gradients arrive as tf.IndexedSlices)."""
    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.reshape(tf.convert_to_tensor(gradient), variable.shape)
    return tf.cast(gradient, variable.dtype)


def no_op():
    return None


def static_shapes(grads, variables):
    """Dense gradients with their variable's static shape: a gradient's can
    be unknown (a table sliced to a variable sequence length), and blocking
    needs it."""
    return [
        g
        if g is None or isinstance(g, tf.IndexedSlices) or g.shape.is_fully_defined()
        else tf.ensure_shape(g, v.shape)
        for g, v in zip(grads, variables)
    ]


def stacked_identity(shape, dtype):
    """Initializer of identity matrices [rows, n, n] (roots or bases before
    the first refresh)."""
    rows, n, _ = shape
    return tf.eye(n, batch_shape=[rows], dtype=dtype)


def concat_rows(tensors):
    """Stacks of matrices joined along their first axis (one op at most)."""
    return tensors[0] if len(tensors) == 1 else tf.concat(tensors, axis=0)


def split_rows(tensor, sizes):
    """The inverse of `concat_rows` for pieces of `sizes` rows."""
    return [tensor] if len(sizes) == 1 else tf.split(tensor, sizes, axis=0)


def unpack(layout, slot, variable):
    """A stored statistics slot as [rows, n, n] (unpacked if packed)."""
    value = read(variable)
    if value.shape.rank == 2:
        return unpack_symmetric(value, layout.slots[slot].size)
    return value
