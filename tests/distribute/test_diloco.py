"""DiLoCo: local steps, an outer optimizer on the mean pseudo-gradient, and
compressed pseudo-gradients with their own error feedback."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import regression_data, replica_values, weights_of

SHAPES = [(5,), (3, 2)]


def run(strategy, optimizer_fn, gradients):
    """gradients[t][r]: replica r's flat gradient at step t."""
    with strategy.scope():
        variables = [keras.Variable(np.zeros(s, "float32")) for s in SHAPES]
        optimizer = optimizer_fn()
        optimizer.build(variables)
    n = strategy.num_replicas_in_sync
    sizes = [int(np.prod(s)) for s in SHAPES]

    @tf.function
    def step(per_replica):
        def replica_step(flat):
            parts = tf.split(flat / n, sizes)
            grads = [tf.reshape(p, s) for p, s in zip(parts, SHAPES)]
            optimizer.apply_gradients(zip(grads, variables))

        strategy.run(replica_step, args=(per_replica,))

    for values in gradients:
        per_replica = strategy.experimental_distribute_values_from_function(
            lambda context, values=values: tf.constant(
                values[context.replica_id_in_sync_group], tf.float32
            )
        )
        step(per_replica)
    return variables, optimizer


def fp16(v):
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float64)


def reference(gradients, lr, every, outer_lr, momentum, compress=None):
    """NumPy DiLoCo: inner SGD per replica; every `every` steps the outer SGD
    (Nesterov) on Δ = mean_i C(x0 − x_i + e_i), then x_i ← x0."""
    n, d = len(gradients[0]), gradients[0][0].size
    x0 = np.zeros(d)
    xs = [np.zeros(d) for _ in range(n)]
    memories = [np.zeros(d) for _ in range(n)]
    velocity = np.zeros(d)
    for t, step in enumerate(gradients, start=1):
        xs = [x - lr * g for x, g in zip(xs, step)]
        if t % every:
            continue
        sent = []
        for i in range(n):
            p = x0 - xs[i] + memories[i]
            c = p if compress is None else compress(p)
            memories[i] = p - c
            sent.append(c)
        delta = np.mean(sent, axis=0)
        # Keras's SGD with Nesterov momentum.
        velocity = momentum * velocity - outer_lr * delta
        x0 = x0 + momentum * velocity - outer_lr * delta
        xs = [x0.copy() for _ in range(n)]
    return xs, x0, memories


@pytest.mark.parametrize("compression", [None, "fp16"])
def test_matches_numpy_reference(mirrored, rng, compression):
    gradients = [[rng.normal(size=11) for _ in range(2)] for _ in range(7)]
    variables, optimizer = run(
        mirrored,
        lambda: tfso.distributed(
            keras.optimizers.SGD(0.1),
            average_every=3,
            outer_optimizer=keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True),
            average_compression=compression,
        ),
        gradients,
    )
    compress = fp16 if compression else None
    xs, x0, memories = reference(gradients, 0.1, 3, 0.7, 0.9, compress)
    for r in range(2):  # step 7 is local: replicas differ from each other
        got = np.concatenate([replica_values(v)[r].reshape(-1) for v in variables])
        np.testing.assert_allclose(got, xs[r], rtol=1e-5, atol=1e-6)
    anchors = optimizer.communicator.local_sgd.anchors
    got = np.concatenate([a.numpy().reshape(-1) for a in anchors])
    np.testing.assert_allclose(got, x0, rtol=1e-5, atol=1e-6)
    if compression:
        local_sgd = optimizer.communicator.local_sgd
        per_replica = [
            np.concatenate(parts)
            for parts in zip(
                *[
                    [r.reshape(-1) for r in m.replica_values()]
                    for m in local_sgd.memories
                ]
            )
        ]
        for r in range(2):
            np.testing.assert_allclose(per_replica[r], memories[r], atol=1e-6)
        assert np.abs(memories[0]).max() > 0  # fp16 dropped something
    # 7 steps, averages after 3 and 6: 2 rounds.
    assert optimizer.communication_stats()["rounds"] == 2
    # The outer optimizer matters.
    plain, _, _ = reference(gradients, 0.1, 3, 1.0, 0.0, compress)
    assert np.abs(plain[0] - xs[0]).max() > 1e-3


def test_int8_pseudo_gradients_send_a_quarter_of_float32_once_per_period(mirrored):
    x, y = regression_data()
    with mirrored.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(256)])
        optimizer = tfso.distributed(
            keras.optimizers.AdamW(0.01),
            average_every=4,
            outer_optimizer="sgd",
            average_compression="int8",
        )
        model.compile(optimizer=optimizer, loss="mse")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(
            optimizer.communication_stats()["bytes_per_step"]
        )
    )
    model.fit(
        x,
        np.tile(y, (1, 86))[:, :256],
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[record],
    )
    # 8·256 + 256 weights: one byte each, and one float32 scale per 256.
    weights = 8 * 256 + 256
    averaged = weights + 4 * (-(-8 * 256 // 256) + 1)
    assert seen == [0, 0, 0, averaged] * 2
    # A quarter of a float32 all-reduce of the weights, once per 4 steps.
    assert optimizer.communication_stats()["float32_bytes_per_step"] == 4 * weights


def test_save_load_resume_equals_uninterrupted(mirrored, tmp_path):
    x, y = regression_data()

    def model():
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        net.compile(
            optimizer=tfso.distributed(
                keras.optimizers.Adam(0.01),
                average_every=3,
                outer_optimizer=keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True),
                average_compression="fp16",
            ),
            loss="mse",
        )
        return net

    def fit(net, epochs):
        net.fit(x[:96], y[:96], batch_size=16, epochs=epochs, verbose=0, shuffle=False)

    with mirrored.scope():
        uninterrupted, first = model(), model()
    fit(uninterrupted, 2)
    fit(first, 1)
    first.save(tmp_path / "diloco.keras")
    inner = [v for v in first.optimizer.variables if "momentum" in v.path]
    assert any(np.abs(np.subtract(*replica_values(v))).max() > 0 for v in inner)
    with mirrored.scope():
        resumed = keras.saving.load_model(tmp_path / "diloco.keras")
    for a, b in zip(first.optimizer.variables, resumed.optimizer.variables):
        for ra, rb in zip(replica_values(a), replica_values(b)):
            np.testing.assert_array_equal(ra, rb, err_msg=a.path)
    fit(resumed, 1)
    # The same ops on the same devices from the same state: equal bits.
    for a, b in zip(weights_of(resumed), weights_of(uninterrupted)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "options, argument",
    [
        ({"outer_optimizer": "sgd"}, "outer_optimizer"),
        ({"average_compression": "int8"}, "average_compression"),
        ({"average_every": 4, "outer_optimizer": 3}, "outer_optimizer"),
        ({"average_every": 4, "outer_optimizer": tfso.Shampoo()}, "outer_optimizer"),
        ({"average_every": 4, "average_compression": "zip"}, "average_compression"),
        (
            {"average_every": 4, "average_compression": "powersgd"},
            "average_compression",
        ),
    ],
)
def test_bad_input_names_the_argument(options, argument):
    with pytest.raises(ValueError, match=f"^`{argument}`"):
        tfso.distributed("adamw", **options)


def test_config_round_trip():
    optimizer = tfso.distributed(
        keras.optimizers.AdamW(0.002),
        average_every=16,
        outer_optimizer=keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True),
        average_compression="int4",
    )
    config = optimizer.get_config()
    assert config["average_compression"] == "int4"
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    outer = clone.communication.outer_optimizer
    assert isinstance(outer, keras.optimizers.SGD) and outer.nesterov
    assert clone.get_config() == config
