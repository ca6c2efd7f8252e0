"""Shampoo inside Keras: compile/fit, custom loops, XLA, mixed precision, strategies."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import (
    assert_agree_to_rounding,
    factor_views,
    fit,
    mlp,
    optimizer_state,
    regression_data,
    replica_values,
    tape_step,
    weights_of,
    widened,
)

# epsilon=1e-4: these tests compare runs that round differently (XLA, replicas,
# custom loop), and early statistics are rank-deficient; a ridge far below
# float32 resolution would amplify rounding noise in their null space.
SHAMPOO = dict(learning_rate=0.01, precondition_frequency=3, block_size=8, epsilon=1e-4)


def test_fit_reduces_loss_and_refreshes():
    model = mlp()
    opt = tfso.Shampoo(**SHAMPOO)
    losses = fit(model, opt, epochs=4)
    assert losses[-1] < 0.5 * losses[0]
    assert int(opt.iterations.numpy()) == 32
    assert int(opt.root_failures.numpy()) == 0
    # Preconditioners moved away from their identity initialisation.
    pre = factor_views(opt, "preconditioner")
    assert pre and all(not np.allclose(v.numpy(), np.eye(v.size)) for v in pre)


def test_string_identifier():
    model = mlp()
    fit(model, "tf_secondorder>Shampoo", epochs=1)
    assert isinstance(model.optimizer, tfso.Shampoo)


@pytest.fixture(scope="module")
def fitted():
    """Weights after `fit(mlp(), Shampoo(...), epochs, batch_size)`, per
    (root_method, epochs, batch_size, dtype), each trained once per module;
    float64 is the same training on widened weights with eigh roots."""
    runs = {}

    def get(root_method="eigh", epochs=2, batch_size=16, dtype="float32"):
        key = (root_method, epochs, batch_size, dtype)
        if key not in runs:
            model = mlp() if dtype == "float32" else widened(mlp(), dtype)
            options = dict(SHAMPOO, root_method=root_method)
            opt = tfso.Shampoo(**options)
            fit(model, opt, epochs=epochs, batch_size=batch_size)
            assert int(opt.root_failures.numpy()) == 0
            runs[key] = weights_of(model)
        return runs[key]

    return get


def test_custom_loop_equals_fit(fitted):
    x, y = regression_data()
    looped = mlp()
    opt = tfso.Shampoo(**SHAMPOO)
    step = tape_step(looped, opt, keras.losses.MeanSquaredError())
    for _ in range(2):
        for i in range(0, len(x), 16):
            step(x[i : i + 16], y[i : i + 16])
    # The same training through another graph (Keras's train step vs a
    # tape): agreement to float32 rounding, measured against float64.
    assert_agree_to_rounding(weights_of(looped), fitted(), fitted(dtype="float64"))


@pytest.mark.parametrize("root_method", ["eigh", "coupled_newton"])
def test_jit_compile_matches_graph(fitted, root_method):
    jitted = mlp()
    opt = tfso.Shampoo(root_method=root_method, **SHAMPOO)
    fit(jitted, opt, epochs=2, jit_compile=True)
    assert int(opt.root_failures.numpy()) == 0
    # XLA fuses and reorders float32 arithmetic and approximates tanh and exp
    # to a few ulps: agreement to float32 rounding, measured as the graph
    # run's distance to float64 (eigh roots, exact: Newton's stopping error
    # counts as rounding); measured here 2.2x that for eigh, 1.8x for Newton.
    assert_agree_to_rounding(
        weights_of(jitted), fitted(root_method), fitted(dtype="float64")
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = mlp()
        losses = fit(model, tfso.Shampoo(**SHAMPOO), epochs=3)
        if policy == "mixed_float16":
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            inner = model.optimizer.inner_optimizer
        else:
            inner = model.optimizer
        assert isinstance(inner, tfso.Shampoo)
        assert int(inner.iterations.numpy()) > 0
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(np.all(np.isfinite(w)) for w in weights_of(model))
    assert losses[-1] < losses[0]


def test_mirrored_strategy_fit_replicas_identical(mirrored, fitted):
    with mirrored.scope():
        model = mlp()
        opt = tfso.Shampoo(**SHAMPOO)
    fit(model, opt, epochs=3, batch_size=32)
    assert int(opt.iterations.numpy()) == 12
    for variable in list(model.weights) + list(opt.variables):
        values = replica_values(variable)
        assert len(values) == 2, variable.path
        np.testing.assert_array_equal(values[0], values[1], err_msg=variable.path)
    # 2 replicas vs 1 device: gradients summed in another order; agreement
    # to float32 rounding, measured against float64 (here 2.8x the gap).
    single = fitted(epochs=3, batch_size=32)
    exact = fitted(epochs=3, batch_size=32, dtype="float64")
    assert_agree_to_rounding(weights_of(model), single, exact)


def _embedding_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(50, 6),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )


def _embedding_data():
    # Indices 0..39 only: rows 40..49 never get a gradient.
    x = np.random.default_rng(0).integers(0, 40, size=(64, 5)).astype("int32")
    y = (x.sum(axis=1) % 2).astype("int32")
    return x, y


def test_embedding_sparse_gradients():
    x, y = _embedding_data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _embedding_model()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    assert isinstance(
        tape.gradient(loss, model.trainable_variables)[0], tf.IndexedSlices
    )
    # The vocabulary (50) is not preconditioned, only the embedding width:
    # a row's update depends on that row's gradient alone.
    opt = tfso.Shampoo(max_preconditioned_dim=32, **SHAMPOO)
    model.compile(optimizer=opt, loss=loss_fn)
    before = model.layers[0].embeddings.numpy().copy()
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    after = model.layers[0].embeddings.numpy()
    used = np.unique(x)
    unused = np.setdiff1d(np.arange(50), used)
    assert len(unused) == 10
    assert not np.allclose(before[used], after[used])
    # A zero gradient row gets a zero update: unchanged bit for bit.
    np.testing.assert_array_equal(before[unused], after[unused])
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert int(opt.root_failures.numpy()) == 0


def test_embedding_sparse_gradients_equal_dense_ones():
    """The same gradients given as tf.IndexedSlices or densified first give
    the same weights and state bit for bit: the optimizer densifies them with
    the same op (tf.convert_to_tensor), and everything else is the same ops.
    """
    x, y = _embedding_data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train(densify):
        model = _embedding_model()
        opt = tfso.Shampoo(max_preconditioned_dim=32, **SHAMPOO)
        kinds = []

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            kinds.append(type(grads[0]).__name__)  # at trace time
            if densify:
                grads = [tf.convert_to_tensor(g) for g in grads]
            opt.apply(grads, model.trainable_variables)

        # 4 steps: the refresh at step 3 is inside.
        for i in range(0, len(x), 16):
            step(x[i : i + 16], y[i : i + 16])
        assert kinds and set(kinds) == {"IndexedSlices"}
        return model, opt

    sparse, sparse_opt = train(densify=False)
    dense, dense_opt = train(densify=True)
    assert int(sparse_opt.iterations.numpy()) == 4
    assert int(sparse_opt.root_failures.numpy()) == 0
    for a, b in zip(weights_of(sparse), weights_of(dense)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(optimizer_state(sparse_opt), optimizer_state(dense_opt)):
        np.testing.assert_array_equal(a, b)
    # Both really trained the used rows.
    initial = _embedding_model().layers[0].embeddings.numpy()
    used = np.unique(x)
    assert not np.allclose(initial[used], weights_of(sparse)[0][used])


def test_nan_gradient_leaves_weights_and_state_unchanged():
    variables = [
        keras.Variable(np.ones((4, 3), "float32")),
        keras.Variable(np.ones(3, "float32")),
    ]
    opt = tfso.Shampoo(precondition_frequency=1)
    good = [tf.ones((4, 3)), tf.ones(3)]
    opt.apply(good, variables)
    weights = [v.numpy().copy() for v in variables]
    state = optimizer_state(opt)
    bad = [tf.fill((4, 3), np.nan), tf.constant([1.0, np.inf, 0.0])]
    opt.apply(bad, variables)
    for v, w in zip(variables, weights):
        np.testing.assert_array_equal(v.numpy(), w)
    after = optimizer_state(opt)
    changed = [
        i for i, (a, b) in enumerate(zip(state, after)) if not np.array_equal(a, b)
    ]
    names = [opt.variables[i].path for i in changed]
    assert sorted(n.split("/")[-1] for n in names) == [
        "iteration",
        "last_skipped_step",
        "nonfinite_steps",
    ]
    assert int(opt.nonfinite_steps.numpy()) == 1
    opt.apply(good, variables)
    assert all(np.all(np.isfinite(v.numpy())) for v in variables)


def test_failed_root_keeps_previous_preconditioner_and_counts():
    variables = [keras.Variable(np.ones((4, 3), "float32"))]
    opt = tfso.Shampoo(
        precondition_frequency=2,
        block_size=4,
        statistics_frequency=1,
        root_refresh="in_step",
    )
    rng = np.random.default_rng(0)
    opt.apply([tf.constant(rng.normal(size=(4, 3)), tf.float32)], variables)
    opt.apply([tf.constant(rng.normal(size=(4, 3)), tf.float32)], variables)  # refresh
    stats = factor_views(opt, "statistics")
    pre = factor_views(opt, "preconditioner")
    kept = [p.numpy().copy() for p in pre]
    stats[0].assign(np.full((stats[0].size,) * 2, np.nan, "float32"))  # poisoned
    for _ in range(2):
        opt.apply([tf.constant(rng.normal(size=(4, 3)), tf.float32)], variables)
    assert int(opt.root_failures.numpy()) == 1
    np.testing.assert_array_equal(pre[0].numpy(), kept[0])
    assert not np.array_equal(pre[1].numpy(), kept[1])  # the healthy one refreshed
    assert np.all(np.isfinite(variables[0].numpy()))


def test_bfloat16_statistics_halve_memory_and_track_float32():
    shape = (16, 12)
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=shape).astype("float32") for _ in range(1500)]

    def run(dtype):
        v = [keras.Variable(np.zeros(shape, "float32"))]
        opt = tfso.Shampoo(statistics_dtype=dtype, precondition_frequency=1000)
        apply = tf.function(lambda g: opt.apply([g], v))
        for g in grads:
            apply(tf.constant(g))
        return [s for s in opt.variables if "statistics" in s.path]

    full, half = run(None), run("bfloat16")
    assert all(s.dtype == "bfloat16" for s in half)
    bytes_full = sum(np.prod(s.shape) * 4 for s in full)
    bytes_half = sum(np.prod(s.shape) * 2 for s in half)
    assert bytes_half * 2 == bytes_full
    for f, h in zip(full, half):
        f, h = f.numpy(), h.numpy().astype("float32")
        # After ~256 steps the β2 = 0.999 increments fall below bfloat16's
        # resolution (2^-8): round-to-nearest freezes the statistics (~35%
        # error here); stochastic rounding keeps them unbiased.
        rel = np.linalg.norm(h - f) / np.linalg.norm(f)
        assert rel < 0.05, rel
