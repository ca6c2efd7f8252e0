"""Shampoo matches an independent NumPy reference over many steps and refreshes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.optimizers.shampoo_reference import NumpyShampoo

# A matrix, a 4-D conv kernel whose small dims merge ([3,3,2,4] -> [9, 8]),
# a 1-D bias, a parameter split into blocks (40 -> 16+16+8) and one whose dims
# all merge into a vector ([2,3,2] -> [12]).
SHAPES = [(6, 10), (3, 3, 2, 4), (5,), (40, 6), (2, 3, 2)]
STEPS = 24


def _gradients(rng, shapes, steps):
    return [
        [rng.normal(size=s) * (1.0 + 0.5 * np.sin(t + i)) for i, s in enumerate(shapes)]
        for t in range(steps)
    ]


def _run_both(dtype, shapes, steps, **kwargs):
    rng = np.random.default_rng(42)
    init = [rng.normal(size=s) for s in shapes]
    grads = _gradients(rng, shapes, steps)
    variables = [keras.Variable(w.astype(dtype), dtype=dtype) for w in init]
    opt = tfso.Shampoo(**kwargs)
    opt.build(variables)

    @tf.function
    def apply(gs):
        opt.apply(gs, variables)

    ref = NumpyShampoo(shapes, **kwargs)
    ref_weights = [w.copy() for w in init]
    for t in range(steps):
        apply([tf.constant(g.astype(dtype)) for g in grads[t]])
        ref_weights = ref.step(ref_weights, grads[t])
    return [v.numpy() for v in variables], ref_weights, opt


BASE = dict(
    learning_rate=0.01,
    block_size=16,
    precondition_frequency=4,
    start_preconditioning_step=4,
    epsilon=1e-6,
)


@pytest.mark.parametrize(
    "options",
    [
        dict(grafting="adam"),
        dict(grafting="sgd", nesterov=True, beta2=0.95, statistics_frequency=3),
        dict(grafting="adagrad", beta1=0.0),
        dict(grafting="rmsprop", exponent_override=2, weight_decay=0.1),
        dict(grafting=None, beta2=1.0),
    ],
    ids=[
        "adam",
        "sgd-nesterov-stats3",
        "adagrad-nomomentum",
        "rmsprop-exp2-wd",
        "none-sum",
    ],
)
def test_matches_reference_float64(options):
    got, want, opt = _run_both("float64", SHAPES, STEPS, **BASE, **options)
    assert int(opt.root_failures.numpy()) == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9)


def test_matches_reference_float32():
    # Roots are computed in float32 here; with rank-deficient statistics and a
    # 1e-6 ridge, Overton's bound is ~1e6/2 · 2^-24 ≈ 3e-2 relative per root.
    # Bugs give O(1) differences.
    got, want, opt = _run_both("float32", SHAPES, STEPS, **BASE)
    assert int(opt.root_failures.numpy()) == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=3e-3, atol=1e-3)


def test_matches_reference_float32_default_epsilon_full_rank():
    # With epsilon=1e-12, below float32 resolution, the null space of a
    # rank-deficient statistic is rounding noise (SPEC §3.3, Overton), so this
    # check uses shapes whose statistics have full rank at the first refresh.
    shapes = [(6, 10), (3, 3, 2, 4), (3,), (40, 6)]
    got, want, opt = _run_both("float32", shapes, STEPS, **dict(BASE, epsilon=1e-12))
    assert int(opt.root_failures.numpy()) == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3)


def test_matches_reference_schedule_and_max_preconditioned_dim():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, 5, 0.7)
    options = dict(BASE, learning_rate=schedule, max_preconditioned_dim=12)
    got, want, _ = _run_both("float64", SHAPES, 12, **options)
    # Keras evaluates the schedule in float32: compare at float32 precision.
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_reference_is_not_trivially_adam():
    """The preconditioned run must differ from the grafting-only run (sanity)."""
    got, _, _ = _run_both("float64", SHAPES, 8, **BASE)
    unpreconditioned, _, _ = _run_both(
        "float64", SHAPES, 8, **dict(BASE, start_preconditioning_step=100)
    )
    assert max(np.abs(a - b).max() for a, b in zip(got, unpreconditioned)) > 1e-3
