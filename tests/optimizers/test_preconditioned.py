"""What Shampoo and SOAP share: layout edge cases and the root exponent."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import assert_root_matches_reference, factor_views
from tf_secondorder.bench.scale import optimizer_op_count
from tf_secondorder.preconditioning.layout import BlockLayout


@pytest.mark.parametrize("make", [tfso.Shampoo, tfso.SOAP], ids=["shampoo", "soap"])
def test_zero_size_variable_is_left_alone(make):
    variables = [
        keras.Variable(np.zeros((0, 4), "float32")),
        keras.Variable(np.ones((3, 4), "float32")),
    ]
    optimizer = make(learning_rate=0.1, precondition_frequency=1)
    optimizer.build(variables)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = [tf.zeros((0, 4)), tf.constant(rng.normal(size=(3, 4)), tf.float32)]
        optimizer.apply_gradients(zip(grads, variables))
    assert variables[0].shape == (0, 4)
    assert np.isfinite(variables[1].numpy()).all()
    assert np.abs(variables[1].numpy() - 1.0).max() > 0
    assert int(optimizer.root_failures.numpy()) == 0


def test_exponent_counts_only_preconditioned_axes():
    """As scalable_shampoo's `exponent_for_preconditioner`: p = 2·(axes with
    a factor). A matrix preconditioned on one side gets (GGᵀ)^(-1/2)."""
    # Block size 8: no two dims merge; the 100 is cut into blocks but, being
    # longer than 50, gets no factor.
    layout = BlockLayout([(4, 100), (4, 6), (3, 3, 5), (7,)], 8, 50)
    by_variable = {}
    for factor in layout.factors:
        by_variable.setdefault(factor.variable, set()).add(factor.exponent)
    assert by_variable == {0: {2}, 1: {4}, 2: {6}, 3: {2}}
    assert all(f.axis == 0 for f in layout.factors if f.variable == 0)
    assert BlockLayout([(4, 100)], 8, 50, exponent_override=6).factors[0].exponent == 6


def test_one_sided_root_is_an_inverse_square_root():
    kernel = keras.Variable(np.zeros((4, 60), "float32"))
    # Block size 64 keeps [4, 60] unmerged; 60 > 50 leaves one side alone.
    optimizer = tfso.Shampoo(
        block_size=64,
        precondition_frequency=1,
        max_preconditioned_dim=50,
        epsilon=1e-6,
        root_refresh="in_step",
    )
    optimizer.build([kernel])
    g = np.random.default_rng(0).normal(size=(4, 60)).astype("float32")
    optimizer.apply_gradients([(tf.constant(g), kernel)])
    (statistic,) = factor_views(optimizer, "statistics")
    (root,) = factor_views(optimizer, "preconditioner")
    assert_root_matches_reference(root.numpy(), statistic.numpy(), 2, 1e-6, "eigh")


@pytest.mark.parametrize("make", [tfso.Shampoo, tfso.SOAP], ids=["shampoo", "soap"])
def test_a_custom_training_step_does_not_run_the_optimizer_through_autograph(make):
    """In a user's `tf.function` (AutoGraph on) the step reaches our code
    through `extended.update`, which would convert every function it calls:
    hundreds of conversions, seconds of tracing. None may be converted."""
    from tensorflow.python.autograph.impl import api as autograph_api

    converted = []
    convert = autograph_api._convert_actual

    def record(entity, program_ctx):
        converted.append(getattr(entity, "__module__", "") or "")
        return convert(entity, program_ctx)

    variables = [keras.Variable(np.ones((6, 4), "float32")), keras.Variable(np.ones(4))]
    optimizer = make(learning_rate=0.1, precondition_frequency=2, weight_decay=0.01)
    optimizer.build(variables)
    grads = [tf.ones((6, 4)), tf.ones((4,))]

    @tf.function
    def step():
        optimizer.apply_gradients(zip(grads, variables))

    autograph_api._convert_actual = record
    try:
        step.get_concrete_function()
    finally:
        autograph_api._convert_actual = convert
    ours = [m for m in converted if m.startswith("tf_secondorder")]
    assert converted, "AutoGraph converted nothing: the probe no longer sees it"
    assert ours == []


@pytest.mark.parametrize("make", [tfso.Shampoo, tfso.SOAP], ids=["shampoo", "soap"])
def test_graph_grows_with_block_shapes_not_blocks(make):
    """Four 512×512 kernels (64 blocks of 128×128) and four 2048×2048 ones
    (1024 blocks) have one block shape: the traced update (statistics,
    refresh, preconditioned step) is the same size for both, up to a couple
    of constants that TensorFlow dedupes differently for other values (an op
    per block would add over 3000)."""
    counts = []
    for width in (512, 2048):
        variables = [
            keras.Variable(np.zeros((width, width), "float32")) for _ in range(4)
        ]
        optimizer = make(block_size=128)
        optimizer.build(variables)
        assert len(optimizer._layout.slots) == 2  # one shape, two axes
        counts.append(optimizer_op_count(optimizer, variables))
    assert abs(counts[0] - counts[1]) <= 4, counts


@pytest.mark.parametrize("make", [tfso.Shampoo, tfso.SOAP], ids=["shampoo", "soap"])
def test_building_in_the_first_trace_equals_building_first(make):
    """Without a strategy Keras builds the optimizer in the first trace of
    the train step (`train_on_batch`, a user's `tf.function`); ours then
    builds eagerly (`tf.init_scope`). The run equals one whose optimizer was
    built before the step, bit for bit."""
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    runs = []
    for build_first in (True, False):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
        optimizer = make(learning_rate=0.01, precondition_frequency=2)
        if build_first:
            optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.MeanSquaredError()

        @tf.function
        def step(model=model, optimizer=optimizer, loss_fn=loss_fn):
            with tf.GradientTape() as tape:
                loss = loss_fn(x[:, :4], model(x))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        for _ in range(5):
            optimizer.advance_root_pipeline()
            step()
        assert int(optimizer.iterations.numpy()) == 5
        runs.append([v.numpy() for v in model.weights + optimizer.variables])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make", [tfso.Shampoo, tfso.SOAP], ids=["shampoo", "soap"])
def test_variables_without_a_gradient_keep_their_state(make):
    """The elementwise state is stacked per block shape (and one vector for
    the variables without factors), so a step that updates only some
    variables must leave the others' rows alone: the updated ones move as
    under an optimizer that holds only them (the same arithmetic on
    smaller stacks: compared to float32 rounding), the others not at all."""
    rng = np.random.default_rng(0)
    # Two share a stack (20·20 > 256: not merged into a vector), two the
    # vector. The matrices' gradients are U·diag(s)·Vᵀ plus small noise,
    # with singular values s well apart: their statistics' eigenvalues
    # are separated, so the bases are unique up to signs (with close
    # eigenvalues, eigh on stacks of 2 and of 1 may pick vectors that
    # differ by far more than rounding).
    shapes = [(20, 20), (20, 20), (6,), (6,)]
    initial = [rng.normal(size=s).astype("float32") for s in shapes]
    # Roots (bases) from the first step's statistics: Shampoo's used from
    # step 1, SOAP's from step 2 (a basis made in the step serves from the
    # next); no refresh later (SOAP's would reorder every block's second
    # moment).
    options = dict(
        learning_rate=0.05,
        precondition_frequency=100,
        start_preconditioning_step=1,
        root_refresh="in_step",
    )
    every = [keras.Variable(v) for v in initial]
    present = [keras.Variable(initial[i]) for i in (0, 2)]
    whole, alone = make(**options), make(**options)
    whole.build(every)
    alone.build(present)
    factors = [np.linalg.qr(rng.normal(size=(20, 20)))[0] for _ in range(4)]
    spectrum = np.diag(np.linspace(1.0, 3.0, 20))

    def gradient(i):
        if len(shapes[i]) == 1:
            return tf.constant(rng.normal(size=shapes[i]), tf.float32)
        u, v = factors[2 * (i % 2)], factors[2 * (i % 2) + 1]
        g = u @ spectrum @ v.T + 0.005 * rng.normal(size=shapes[i])
        return tf.constant(g, tf.float32)

    for _ in range(2):  # every variable, up to SOAP's first use of a basis
        first = [gradient(i) for i in range(4)]
        whole.apply_gradients(zip(first, every))
        alone.apply_gradients(zip([first[0], first[2]], present))
    after_first = [v.numpy() for v in every]
    state = {v.path: v.numpy() for v in whole.variables}
    for _ in range(4):
        grads = [gradient(i) for i in (0, 2)]
        whole.apply_gradients(zip(grads, [every[0], every[2]]))
        alone.apply_gradients(zip(grads, present))
    # Tolerance: eigh and the roots run on stacks of 2 and of 1, which
    # round differently; a root of a statistic with condition number up to
    # 1/ε = 1e4 amplifies float32's relative rounding (6e-8) by up to
    # √1e4 = 100, so ~6e-6 per step, a few times that over the steps.
    # SOAP's normalisation in the basis amplifies the bases' rounding
    # further where a rotated gradient entry is small: 1e-3, still far
    # below how far the variables move.
    atol = 3e-5 if make is tfso.Shampoo else 1e-3
    for i, reference in zip((0, 2), present):
        mine = every[i].numpy()
        np.testing.assert_allclose(mine, reference.numpy(), rtol=1e-4, atol=atol)
        assert np.abs(mine - after_first[i]).max() > 30 * atol, np.abs(
            mine - after_first[i]
        ).max()
    np.testing.assert_array_equal(every[1].numpy(), after_first[1])
    np.testing.assert_array_equal(every[3].numpy(), after_first[3])
    # Their elementwise state is as step 2 left it: stack row 1
    # (variable 1's block) and elements 6..11 of the vector (variable 3).
    checked = 0
    for variable in whole.variables:
        if not any(k in variable.path for k in ("momentum", "moment", "accumulator")):
            continue
        old, new = state[variable.path], variable.numpy()
        rows = (lambda a: a[1]) if new.ndim == 3 else (lambda a: a[6:])
        assert np.any(rows(new)), variable.path
        np.testing.assert_array_equal(rows(new), rows(old), err_msg=variable.path)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("make", [tfso.Shampoo, tfso.SOAP], ids=["shampoo", "soap"])
def test_a_side_of_length_one_gets_no_factor(make):
    """257 rows in blocks of 256 leave a 1-row block: its 1×1 factor would
    couple nothing (and SOAP's eigenbasis of a 1×1 inside a traced cond
    came back empty from TensorFlow, which broke the host's install). The run,
    with roots computed on the host and installed between steps, trains."""
    layout = BlockLayout([(257, 16)], 256)
    assert {f.size for f in layout.factors} == {256, 16}
    assert sorted(g.axes for g in layout.groups) == [(0, 1), (1,)]
    model = keras.Sequential(
        [keras.Input((257,)), keras.layers.Dense(16, use_bias=False)]
    )
    optimizer = make(learning_rate=1e-2, precondition_frequency=2, refresh_delay=1)
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 257)).astype("float32")
    y = x[:, :16]
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert int(optimizer._refreshes.numpy()) >= 3
    assert int(optimizer.root_failures.numpy()) == 0
    assert np.isfinite(model.get_weights()[0]).all()
