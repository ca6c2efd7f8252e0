"""Shampoo and SOAP under Keras's mixed-precision policies.

Under `mixed_bfloat16` and `mixed_float16` the layers compute in 16 bits
and keep float32 weights; the optimizers get float32 gradients of 16-bit
arithmetic (unscaled by Keras's LossScaleOptimizer under float16) and must
train about as well as in float32. "About as well" is a quality claim, not
a rounding one: the runs round differently at every step, so their losses
are compared with a margin (below), not to rounding.
"""

import keras
import numpy as np
import pytest

import tf_secondorder as tfso
from tests.helpers import regression_data, replica_values

POLICIES = ["mixed_bfloat16", "mixed_float16"]
# A preconditioned run within 25% of its float32 loss: bfloat16 keeps 8
# significant bits (relative rounding 2^-9), so activations and gradients
# carry ~0.2% noise per operation, which moves a 60-step run's loss by a
# few percent; a statistic built from scaled gradients or noise amplified
# by the roots changes it by far more (tens of percent to divergence).
LOSS_MARGIN = 1.25


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(3),
            # Outputs in float32 under a mixed policy, as Keras advises.
            keras.layers.Activation("linear", dtype="float32"),
        ]
    )


OPTIMIZERS = {
    "shampoo": lambda: tfso.Shampoo(
        learning_rate=3e-3, precondition_frequency=10, statistics_frequency=1
    ),
    "soap": lambda: tfso.SOAP(learning_rate=3e-3, precondition_frequency=10),
}


@pytest.fixture
def policy():
    """Sets a global dtype policy for one test and restores float32 after."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def _train(make_optimizer, precision, policy, epochs=8, strategy=None):
    policy(precision)
    x, y = regression_data(n=256)
    scope = strategy.scope() if strategy is not None else _NoScope()
    with scope:
        model = _model()
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, epochs=epochs, batch_size=32, shuffle=False, verbose=0)
    return model, optimizer, history.history["loss"]


class _NoScope:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False


@pytest.mark.parametrize("precision", POLICIES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_trains_as_well_as_float32(name, precision, policy):
    _, reference, want = _train(OPTIMIZERS[name], "float32", policy)
    model, optimizer, got = _train(OPTIMIZERS[name], precision, policy)
    # The roots were used (not a run of the grafting optimizer alone).
    assert int(optimizer.iterations.numpy()) == 64
    assert optimizer.first_preconditioned_step < 64
    assert int(optimizer.root_failures.numpy()) == 0
    assert got[-1] < 0.5 * got[0]
    assert got[-1] <= LOSS_MARGIN * want[-1], (got, want)
    for variable in optimizer.variables:
        assert variable.dtype in ("float32", "int64", "int32", "bfloat16")
        assert np.all(np.isfinite(np.asarray(variable.numpy(), np.float32)))
    if precision == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.optimizer.inner_optimizer is optimizer


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_float16_statistics_are_unscaled(name, policy):
    # Keras scales the loss by 2^15 and unscales the gradients before the
    # optimizer sees them: a statistic of scaled gradients would be 2^30
    # times the float32 run's, and its roots 2^-15 times.
    _, float32, _ = _train(OPTIMIZERS[name], "float32", policy, epochs=1)
    model, float16, _ = _train(OPTIMIZERS[name], "mixed_float16", policy, epochs=1)
    assert float(model.optimizer.dynamic_scale.numpy()) >= 2.0**10
    for a, b in zip(float32._statistics, float16._statistics, strict=True):
        ratio = np.linalg.norm(b.numpy()) / np.linalg.norm(a.numpy())
        assert 0.5 < ratio < 2.0, ratio


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_float16_overflow_skips_the_whole_step(name, policy):
    policy("mixed_float16")
    x, y = regression_data(n=32)
    model = _model()
    inner = OPTIMIZERS[name]()
    # A scale no float16 gradient survives: the first steps overflow.
    scaled = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**40)
    model.compile(optimizer=scaled, loss="mse")
    weights = [w.numpy() for w in model.weights]
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    assert int(inner.iterations.numpy()) == 0
    for before, after in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())
    for variable in inner.variables:
        assert np.all(np.isfinite(np.asarray(variable.numpy(), np.float32)))
    assert float(scaled.dynamic_scale.numpy()) < 2.0**40
    # Once the scale has come down, steps are taken.
    model.fit(x, y, epochs=60, batch_size=32, verbose=0)
    assert int(inner.iterations.numpy()) > 0


@pytest.mark.parametrize("precision", POLICIES)
def test_mirrored_fit_replicas_agree(precision, policy, mirrored):
    _, _, want = _train(OPTIMIZERS["shampoo"], "float32", policy, epochs=4)
    model, optimizer, got = _train(
        OPTIMIZERS["shampoo"], precision, policy, epochs=4, strategy=mirrored
    )
    assert optimizer.first_preconditioned_step < int(optimizer.iterations.numpy())
    assert got[-1] <= LOSS_MARGIN * want[-1], (got, want)
    for variable in model.weights + optimizer.variables:
        first, *others = replica_values(variable)
        for other in others:
            np.testing.assert_array_equal(first, other)
