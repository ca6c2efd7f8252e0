"""Saddle escape by perturbation on f(x, y) = x² − y² + y⁴/4."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import mlp, regression_data


def saddle(v):
    return v[0] ** 2 - v[1] ** 2 + v[1] ** 4 / 4


def descend(escape, steps=100, make=None):
    """Gradient descent from the strict saddle at the origin."""
    v = keras.Variable(np.zeros(2, "float32"))
    make = make or (lambda **o: tfso.distributed(keras.optimizers.SGD(0.1), **o))
    optimizer = make(saddle_escape=escape)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            f = saddle(v)
        optimizer.apply([tape.gradient(f, v)], [v])

    for _ in range(steps):
        step()
    return v.numpy(), float(saddle(v.numpy())), optimizer


def test_leaves_the_saddle_only_with_the_option():
    stuck, f_stuck, _ = descend(None)
    np.testing.assert_array_equal(stuck, [0.0, 0.0])  # ∇f(0) = 0: SGD stays
    assert f_stuck == 0.0
    escaped, f_escaped, optimizer = descend(tfso.SaddleEscape(radius=1e-2))
    # the minima are (0, ±√2) with f = −1
    np.testing.assert_allclose(abs(escaped[1]), np.sqrt(2), rtol=1e-4)
    assert f_escaped == pytest.approx(-1.0, abs=1e-5)
    assert int(optimizer.saddle_perturbations.numpy()) >= 1


def test_also_for_shampoo():
    make = lambda **o: tfso.Shampoo(  # noqa: E731
        learning_rate=0.05, precondition_frequency=5, **o
    )
    _, f_stuck, _ = descend(None, make=make)
    _, f_escaped, _ = descend(tfso.SaddleEscape(radius=1e-2), steps=300, make=make)
    assert f_stuck == 0.0 and f_escaped < -0.99


def test_at_most_once_per_interval_and_only_when_gradients_are_small():
    v = keras.Variable(np.zeros(2, "float32"))
    opt = tfso.distributed(
        keras.optimizers.SGD(0.1),
        saddle_escape=tfso.SaddleEscape(radius=1e-2, interval=30),
    )
    at = []
    for step in range(1, 121):
        with tf.GradientTape() as tape:
            f = saddle(v)
        gradient = tape.gradient(f, v)
        count = int(opt.saddle_perturbations.numpy()) if opt.built else 0
        opt.apply([gradient], [v])
        if int(opt.saddle_perturbations.numpy()) > count:
            at.append(step)
            assert np.linalg.norm(gradient.numpy()) < 1e-3
    # at the saddle first; later ones at the minimum, 30 steps apart or more
    assert at[0] == 1 and len(at) >= 2
    assert all(b - a >= 30 for a, b in zip(at, at[1:]))
    # large gradients: never
    v = keras.Variable(np.ones(3, "float32"))
    opt = tfso.distributed("sgd", saddle_escape=tfso.SaddleEscape(threshold=1e-3))
    opt.apply([tf.ones(3)], [v])
    assert int(opt.saddle_perturbations.numpy()) == 0


def test_perturbation_is_uniform_in_the_ball():
    from tf_secondorder.distribute.saddle import ball_sample  # noqa: I001

    norms = [
        float(
            np.linalg.norm(
                np.concatenate(ball_sample([2, 1], 0.5, tf.constant([0, s])))
            )
        )
        for s in range(400)
    ]
    assert max(norms) <= 0.5 + 1e-6
    # uniform in a 3-ball: P(‖ξ‖ < r/2) = 1/8
    assert abs(np.mean(np.array(norms) < 0.25) - 0.125) < 0.05


def test_replicas_get_the_same_perturbation(mirrored):
    x, y = regression_data()
    with mirrored.scope():
        model = mlp()
        opt = tfso.distributed(
            "sgd", saddle_escape=tfso.SaddleEscape(threshold=1e3, interval=1)
        )
        model.compile(optimizer=opt, loss="mse")
    model.fit(x[:32], y[:32], batch_size=16, verbose=0)
    assert int(opt.saddle_perturbations.numpy()) == 2
    from tests.helpers import replica_values

    for variable in model.trainable_variables:
        a, b = replica_values(variable)
        np.testing.assert_array_equal(a, b)


def test_config_round_trip_and_bad_input():
    opt = tfso.Shampoo(saddle_escape=tfso.SaddleEscape(radius=0.1, interval=7))
    clone = tfso.Shampoo.from_config(opt.get_config())
    assert (
        clone.communication.saddle_escape.get_config()
        == opt.communication.saddle_escape.get_config()
    )
    for kwargs, name in [
        ({"threshold": 0}, "threshold"),
        ({"radius": -1}, "radius"),
        ({"interval": 0}, "interval"),
    ]:
        with pytest.raises(ValueError, match=name):
            tfso.SaddleEscape(**kwargs)
    with pytest.raises(ValueError, match="saddle_escape"):
        tfso.distributed("sgd", saddle_escape="yes")
    with pytest.raises(ValueError, match="saddle_escape"):
        tfso.distributed("sgd", saddle_escape=tfso.SaddleEscape(), average_every=2)
