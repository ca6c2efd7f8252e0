"""SOAP: NumPy reference, Keras integration, strategies, XLA, saving, bad input."""

import copy

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import (
    FLOAT32_UNIT_ROUNDOFF,
    assert_agree_to_rounding,
    factor_views,
    fit,
    mlp,
    optimizer_state,
    regression_data,
    replica_values,
    weights_of,
    widened,
)
from tests.optimizers.soap_reference import NumpySOAP

# A matrix, a conv kernel merging to [9, 8], a bias, a parameter split into
# blocks (40 -> 16+16+8) and one merging to a vector ([2,3,2] -> [12]).
SHAPES = [(6, 10), (3, 3, 2, 4), (5,), (40, 6), (2, 3, 2)]
STEPS = 24
# The first basis is taken at step 12, when every statistic has full rank (an
# eigenbasis of a rank-deficient matrix is arbitrary in its null space, so a
# reference could not match it); power-QR refreshes follow at 16, 20 and 24.
BASE = dict(
    learning_rate=0.01,
    block_size=16,
    precondition_frequency=4,
    start_preconditioning_step=12,
)


def _run_both(dtype, steps=STEPS, shapes=SHAPES, **options):
    rng = np.random.default_rng(42)
    init = [rng.normal(size=s) for s in shapes]
    grads = [
        [rng.normal(size=s) * (1.0 + 0.5 * np.sin(t + i)) for i, s in enumerate(shapes)]
        for t in range(steps)
    ]
    variables = [keras.Variable(w.astype(dtype), dtype=dtype) for w in init]
    opt = tfso.SOAP(**options)
    opt.build(variables)
    apply = tf.function(lambda gs: opt.apply(gs, variables))
    ref = NumpySOAP(shapes, **options)
    want = [w.copy() for w in init]
    for t in range(steps):
        apply([tf.constant(g.astype(dtype)) for g in grads[t]])
        want = ref.step(want, grads[t])
    return [v.numpy() for v in variables], want, opt


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(shampoo_beta=0.99, beta1=0.9, beta2=0.99, weight_decay=0.1),
        dict(max_preconditioned_dim=8, epsilon=1e-6),
        dict(precondition_1d=True, packed_statistics=True),
        dict(root_refresh="in_step"),
        dict(refresh_delay=1),
    ],
    ids=["defaults", "betas-wd", "max-dim", "vectors-packed", "in-step", "delay1"],
)
def test_matches_reference_float64(options):
    got, want, opt = _run_both("float64", **BASE, **options)
    assert int(opt.root_failures.numpy()) == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-10)


def test_matches_reference_float32():
    got, want, opt = _run_both("float32", **BASE)
    assert int(opt.root_failures.numpy()) == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_a_basis_made_in_the_step_serves_from_the_next_step():
    """Refreshed in the step, the first basis (from step 1's gradient alone)
    is first used at step 2, and float32 follows the float64 reference.
    Used at step 1, on the gradient G₁ that made it, it would fail: G₁ is
    diagonal in its own basis up to rounding, and Adam's normalisation turns
    float32's rounding noise there (about u·|G₁|, above ε) into full-size
    entries, which float64 (noise far below ε) does not have."""
    shapes = [(8, 8), (6, 6)]  # square: one gradient's statistics have full rank
    options = dict(
        learning_rate=0.01,
        block_size=16,
        precondition_frequency=2,
        start_preconditioning_step=1,
        root_refresh="in_step",
    )
    got, want, opt = _run_both("float32", steps=8, shapes=shapes, **options)
    assert int(opt.root_failures.numpy()) == 0
    # Each weight moves by about lr = 0.01 per step; float32 rounding, with
    # eigenvectors moved by about u/gap (the first statistics' eigenvalue
    # gaps are ≥ 1% of their largest), leaves ~1e-7 after 8 steps.
    # A basis used on its own gradient misses by about lr (2e-2 when tried).
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_is_adam_before_the_first_basis_and_differs_after():
    before, _, _ = _run_both("float64", steps=11, **BASE)
    rng = np.random.default_rng(42)
    init = [rng.normal(size=s) for s in SHAPES]
    variables = [keras.Variable(w) for w in init]
    adam = keras.optimizers.Adam(0.01, beta_1=0.95, beta_2=0.95, epsilon=1e-8)
    for t in range(11):
        grads = [
            rng.normal(size=s) * (1.0 + 0.5 * np.sin(t + i))
            for i, s in enumerate(SHAPES)
        ]
        adam.apply([tf.constant(g) for g in grads], variables)
    # Keras's Adam rounds its step size through float32.
    for a, b in zip(before, variables):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-8)
    rotated, _, _ = _run_both("float64", **BASE)
    identity, _, _ = _run_both("float64", **dict(BASE, start_preconditioning_step=99))
    assert max(np.abs(a - b).max() for a, b in zip(rotated, identity)) > 1e-3


# First basis at step 17, when even the 16-long bias's statistic (rank one
# per step) has full rank: runs that round differently must not pick
# different bases of a null space. Refreshes at 17, 20, 23.
SMALL = dict(
    learning_rate=0.01,
    block_size=8,
    precondition_frequency=3,
    start_preconditioning_step=17,
)


def test_fit_reduces_loss_and_string_identifier():
    model = mlp()
    losses = fit(model, tfso.SOAP(**SMALL), epochs=4)
    assert losses[-1] < 0.5 * losses[0]
    bases = factor_views(model.optimizer, "basis")
    assert bases and all(
        not np.allclose(v.numpy(), np.eye(len(v.numpy()))) for v in bases
    )
    again = mlp()
    fit(again, "tf_secondorder>SOAP", epochs=1)
    assert isinstance(again.optimizer, tfso.SOAP)


def test_jit_compiled_train_step_matches_graph():
    plain, jitted = mlp(), mlp()
    fit(plain, tfso.SOAP(**SMALL), epochs=3)
    opt = tfso.SOAP(**SMALL)
    fit(jitted, opt, epochs=3, jit_compile=True)
    assert int(opt.root_failures.numpy()) == 0
    exact = widened(mlp(), "float64")
    fit(exact, tfso.SOAP(**SMALL), epochs=3)
    # XLA fuses and reorders float32 arithmetic (and its eigh rounds
    # otherwise): agreement to float32 rounding, measured as the graph run's
    # distance to float64.
    assert_agree_to_rounding(weights_of(jitted), weights_of(plain), weights_of(exact))


def test_mirrored_fit_split_equals_unsplit_and_single_device(mirrored):
    runs = {}
    for split in (True, False):
        with mirrored.scope():
            model = mlp()
            opt = tfso.SOAP(distribute_roots=split, **SMALL)
        fit(model, opt, epochs=6, batch_size=32)
        for variable in list(model.weights) + list(opt.variables):
            a, b = replica_values(variable)
            np.testing.assert_array_equal(a, b, err_msg=variable.path)
        runs[split] = weights_of(model) + optimizer_state(opt)
        steps = int(opt.iterations.numpy())
    # Split and unsplit refreshes run the same float32 arithmetic, but the
    # batched eigh/QR/matmul kernels see different batches, which may change
    # their rounding: a refreshed basis of side n may differ by ~n·u (u =
    # 2^-24). A basis off by an angle δ changes a step's update by ~δ
    # relative; over the run's steps these add up to at most steps·n·u.
    drift = steps * SMALL["block_size"] * FLOAT32_UNIT_ROUNDOFF
    for a, b in zip(runs[True], runs[False]):
        np.testing.assert_allclose(a, b, rtol=drift, atol=drift * np.abs(b).max())
    single = mlp()
    fit(single, tfso.SOAP(**SMALL), epochs=6, batch_size=32)
    for a, b in zip(runs[True], weights_of(single)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_save_load_resume_equals_uninterrupted(tmp_path):
    uninterrupted = mlp()
    fit(uninterrupted, tfso.SOAP(**SMALL), epochs=4)
    first = mlp()
    # 24 steps: saved with bases from refreshes 17, 20, 23, resumed across 26.
    fit(first, tfso.SOAP(**SMALL), epochs=3)
    first.save(tmp_path / "soap.keras")
    loaded = keras.saving.load_model(tmp_path / "soap.keras")
    assert isinstance(loaded.optimizer, tfso.SOAP)
    for a, b in zip(
        optimizer_state(first.optimizer), optimizer_state(loaded.optimizer)
    ):
        np.testing.assert_array_equal(a, b)
    x, y = regression_data()
    loaded.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    for a, b in zip(weights_of(loaded), weights_of(uninterrupted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The check can fail: a fresh optimizer on the saved weights drifts.
    restarted = mlp()
    restarted.set_weights(first.get_weights())
    fit(restarted, tfso.SOAP(**SMALL), epochs=1)  # Adam's moments restart
    drift = max(
        np.abs(a - b).max()
        for a, b in zip(weights_of(restarted), weights_of(uninterrupted))
    )
    assert drift > 1e-4


def test_nan_gradient_skipped_and_failed_refresh_keeps_basis():
    rng = np.random.default_rng(0)
    variables = [keras.Variable(np.ones((4, 3), "float32"))]
    opt = tfso.SOAP(
        precondition_frequency=2, start_preconditioning_step=2, root_refresh="in_step"
    )
    for _ in range(3):  # bases at step 2
        opt.apply([tf.constant(rng.normal(size=(4, 3)), tf.float32)], variables)
    before = variables[0].numpy().copy()
    opt.apply([tf.fill((4, 3), np.nan)], variables)
    np.testing.assert_array_equal(variables[0].numpy(), before)
    assert int(opt.nonfinite_steps.numpy()) == 1
    bases = factor_views(opt, "basis")
    stats = factor_views(opt, "statistics")
    kept = bases[0].numpy().copy()
    stats[0].assign(np.full((stats[0].size,) * 2, np.inf, "float32"))
    opt.apply([tf.constant(rng.normal(size=(4, 3)), tf.float32)], variables)  # step 5?
    opt.apply([tf.constant(rng.normal(size=(4, 3)), tf.float32)], variables)
    assert int(opt.root_failures.numpy()) == 1
    np.testing.assert_array_equal(bases[0].numpy(), kept)
    assert np.all(np.isfinite(variables[0].numpy()))


@pytest.mark.parametrize(
    "name, value",
    [
        ("learning_rate", -1.0),
        ("beta1", 1.0),
        ("beta2", 1.0),
        ("shampoo_beta", 0.0),
        ("epsilon", -1.0),
        ("block_size", 0),
        ("precondition_frequency", 0),
        ("start_preconditioning_step", 0),
        ("max_preconditioned_dim", 0),
        ("statistics_dtype", "int8"),
        ("distribute_roots", "yes"),
        ("compression", "gzip"),
    ],
)
def test_invalid_argument_is_named(name, value):
    with pytest.raises(ValueError, match=f"`?{name}`?"):
        tfso.SOAP(**{name: value})


def test_config_round_trip():
    opt = tfso.SOAP(
        learning_rate=keras.optimizers.schedules.CosineDecay(0.01, 100),
        beta1=0.9,
        shampoo_beta=0.99,
        block_size=64,
        precondition_frequency=7,
        start_preconditioning_step=3,
        max_preconditioned_dim=500,
        statistics_dtype="bfloat16",
        distribute_roots=False,
        compression="sign",
        weight_decay=0.01,
        name="my_soap",
    )
    serialized = keras.optimizers.serialize(opt)
    restored = keras.optimizers.deserialize(copy.deepcopy(serialized))
    assert isinstance(restored, tfso.SOAP)
    assert keras.optimizers.serialize(restored) == serialized
