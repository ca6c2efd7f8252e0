"""A step whose gradients hold NaN/Inf is skipped whole, by every optimizer.

"Whole": the weights (decoupled weight decay included), every optimizer slot,
per-replica memory (error feedback, Signum momenta, PowerSGD factors, the
bidirectional server memory) and the EMA stay as they were on every replica,
even when only one replica's gradient of one variable is not finite. Only
`iterations` advances (schedules and workers stay in step), with the
communication counters (the exchange did happen), and `nonfinite_steps`
counts the skip.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import replica_values

# Counters meant to move on a skipped step: the step number, the skips, and
# the bytes and rounds of the exchange (which did happen).
COUNTERS = ("iteration", "nonfinite_steps", "last_skipped_step", "communication_")


def _optimizers():
    decay = dict(weight_decay=0.1, use_ema=True)
    return {
        "shampoo": lambda: tfso.Shampoo(0.01, precondition_frequency=1, **decay),
        "soap": lambda: tfso.SOAP(0.01, precondition_frequency=1, **decay),
        "signsgd": lambda: tfso.SignSGD(0.01, momentum=0.9, **decay),
        "adamw+topk": lambda: tfso.distributed(
            keras.optimizers.AdamW(0.01, **decay), compression="topk"
        ),
        "sgd+powersgd": lambda: tfso.distributed(
            keras.optimizers.SGD(0.01, momentum=0.9), compression="powersgd"
        ),
        "adam+bidirectional": lambda: tfso.distributed(
            keras.optimizers.Adam(0.01),
            compression="scaled_sign",
            aggregation="bidirectional",
        ),
        "adam+local_sgd": lambda: tfso.distributed(
            keras.optimizers.Adam(0.01, **decay), average_every=2
        ),
    }


def _everything(model, optimizer):
    """Per-replica values of the weights and of every optimizer variable
    except the counters that are meant to move."""
    variables = list(model.weights) + [
        v for v in optimizer.variables if not any(c in v.path for c in COUNTERS)
    ]
    return {v.path: replica_values(v) for v in variables}


@pytest.mark.parametrize("name", list(_optimizers()))
def test_nonfinite_gradient_on_one_replica_skips_the_step_everywhere(mirrored, name):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 8, 8)).astype("float32"))
    y = tf.constant(rng.normal(size=(2, 8, 32)).astype("float32"))
    with mirrored.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(64), keras.layers.Dense(32)]
        )
        optimizer = _optimizers()[name]()
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(poison):
        def replica_fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x[r]) - y[r]) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            # Replica 1's gradient of the first kernel, one element, poisoned.
            bad = tf.logical_and(poison, tf.equal(r, 1))
            mask = tf.one_hot(3, tf.size(grads[0]), on_value=np.nan, off_value=0.0)
            grads[0] = grads[0] + tf.where(bad, tf.reshape(mask, grads[0].shape), 0.0)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        mirrored.run(replica_fn)

    for _ in range(3):
        step(tf.constant(False))
    before = _everything(model, optimizer)
    iterations = int(optimizer.iterations.numpy())
    step(tf.constant(True))
    after = _everything(model, optimizer)
    for path, values in before.items():
        for replica, (a, b) in enumerate(zip(values, after[path])):
            np.testing.assert_array_equal(a, b, err_msg=f"{path} on replica {replica}")
    assert int(optimizer.iterations.numpy()) == iterations + 1
    assert int(optimizer.nonfinite_steps.numpy()) == 1
    step(tf.constant(False))
    moved = _everything(model, optimizer)
    kernel = model.trainable_variables[0].path
    assert np.abs(moved[kernel][0] - after[kernel][0]).max() > 0
    for values in moved.values():
        assert all(np.isfinite(v).all() for v in values)
