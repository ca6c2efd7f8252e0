"""Compressed cross-replica training inside model.fit on 2 logical CPUs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.distribute import compression_reference as ref
from tests.helpers import mlp, regression_data, replica_values, weights_of

C = tfso.compression

# One compressor of each path through model.fit: an all-reduced cast, a
# gathered sign with error feedback, per-replica random draws, draws shared
# by the replicas (no XLA kernel), two rounds with state. Every codec's
# maths is checked in test_compressors.py, every protocol there and below.
COMPRESSORS = ["fp16", C.Sign(), "qsgd", C.RandomK(ratio=0.25), C.PowerSGD(rank=2)]


def _fit(strategy, optimizer_fn, epochs=10, x=None, y=None, callbacks=()):
    if x is None:
        x, y = regression_data(256)
    with strategy.scope():
        model = mlp()
        optimizer = optimizer_fn()
        model.compile(optimizer=optimizer, loss="mse")
    initial = model.evaluate(x, y, verbose=0)
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
    return model, optimizer, initial, history


@pytest.mark.parametrize("compression", COMPRESSORS, ids=lambda c: repr(c))
def test_every_compressor_trains_in_fit(mirrored, compression):
    """The wiring in model.fit: every compressor lowers the loss, leaves the
    replicas identical and counts its bytes. Whether a compressor's
    algorithm is right is checked against NumPy below and in
    test_compressors.py; how well each trains is a benchmark
    (docs/benchmarks.md), not a test."""
    model, optimizer, initial, history = _fit(
        mirrored,
        lambda: tfso.distributed(keras.optimizers.SGD(0.05), compression=compression),
        epochs=2,
    )
    assert history.history["loss"][-1] < initial
    for weight in model.weights:
        first, second = replica_values(weight)
        np.testing.assert_array_equal(first, second)
    stats = optimizer.communication_stats()
    assert 0 < stats["bytes_per_step"] < stats["float32_bytes_per_step"]


def _run_on_replicas(strategy, optimizer_fn, shapes, gradients):
    """gradients[t][r]: replica r's flat gradient at step t (what it computed;
    Keras hands the optimizer g/N)."""
    with strategy.scope():
        variables = [keras.Variable(np.zeros(s, "float32")) for s in shapes]
        optimizer = optimizer_fn()
        optimizer.build(variables)
    n = strategy.num_replicas_in_sync
    sizes = [int(np.prod(s)) for s in shapes]

    @tf.function
    def step(per_replica):
        def replica_step(flat):
            parts = tf.split(flat / n, sizes)
            grads = [tf.reshape(p, s) for p, s in zip(parts, shapes)]
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


EF_SHAPES = [(40,), (8, 8)]


@pytest.mark.parametrize(
    "compression, reference",
    [
        (C.Sign(), ref.sign),
        (C.ScaledSign(), ref.scaled_sign),
        (C.ScaledSign(bucket_size=32), lambda x: ref.bucket_scaled_sign(x, 32)),
        (C.TopK(0.25), lambda x: ref.topk(x, 0.25)),
        (C.Float16(), ref.fp16),
    ],
    ids=["sign", "scaled_sign", "block_sign", "topk", "fp16"],
)
def test_error_feedback_matches_numpy_on_two_replicas(mirrored, compression, reference):
    """p_i = g_i + e_i, c_i = C(p_i), e_i ← p_i − c_i per replica and tensor;
    SGD on the mean of the c_i, over 6 steps. A memory that is not per
    replica, not per tensor, not kept or kept wrong lands elsewhere."""
    rng = np.random.default_rng(1)
    sizes = [int(np.prod(s)) for s in EF_SHAPES]
    gradients = [[rng.normal(size=sum(sizes)) for _ in range(2)] for _ in range(6)]
    lr = 0.1
    variables, optimizer = _run_on_replicas(
        mirrored,
        lambda: tfso.distributed(
            keras.optimizers.SGD(lr), compression=compression, error_feedback=True
        ),
        EF_SHAPES,
        gradients,
    )
    memories = [np.zeros(sum(sizes)) for _ in range(2)]
    weights = np.zeros(sum(sizes))
    for step in gradients:
        sent = []
        for r, g in enumerate(step):
            p = (g + memories[r]).astype(np.float32)
            parts = np.split(p, np.cumsum(sizes)[:-1])
            c = np.concatenate(
                [
                    reference(part.reshape(s)).reshape(-1)
                    for part, s in zip(parts, EF_SHAPES)
                ]
            )
            memories[r] = p - c
            sent.append(c)
        if compression.summable:
            # float16 wires are summed in float16 by the all-reduce.
            weights -= lr * ref.fp16(sent[0] + sent[1]) / 2
        else:
            weights -= lr * np.mean(sent, axis=0)
    got = np.concatenate([v.numpy().reshape(-1) for v in variables])
    np.testing.assert_allclose(got, weights, rtol=1e-5, atol=1e-6)
    stored = [
        np.concatenate(parts)
        for parts in zip(
            *[
                [r.reshape(-1) for r in m.replica_values()]
                for m in optimizer.communicator.aggregator.memories
            ]
        )
    ]
    for r in range(2):
        np.testing.assert_allclose(stored[r], memories[r], rtol=1e-5, atol=1e-6)
    # Per replica: the memories differ (for fp16 by rounding errors only).
    assert np.abs(memories[0] - memories[1]).max() > 1e-4


# With one replica the path is the same for every compressor; these three
# cover error feedback (sign, topk) and compressor state (powersgd).
@pytest.mark.parametrize("compression", ["sign", "topk", "powersgd"])
def test_without_a_strategy_options_are_a_no_op(compression):
    x, y = regression_data(64)
    results = []
    for options in ({}, {"compression": compression}):
        model = mlp()
        optimizer = tfso.distributed(keras.optimizers.Adam(0.01), **options)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append(weights_of(model))
        assert optimizer.communication_stats()["rounds"] == 0
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_shampoo_compresses_and_replicas_stay_identical(mirrored):
    model, optimizer, initial, history = _fit(
        mirrored,
        lambda: tfso.Shampoo(
            0.01, precondition_frequency=4, epsilon=1e-4, compression="qsgd"
        ),
    )
    assert history.history["loss"][-1] < 0.3 * initial
    for weight in model.weights + optimizer.variables:
        values = replica_values(weight)
        if "error_feedback" not in weight.path:
            np.testing.assert_array_equal(values[0], values[-1])
    assert not optimizer.communication.uses_error_feedback  # qsgd is unbiased


# Adam: moments; SGD: momentum; Muon: its own weight decay and update rule.
@pytest.mark.parametrize("name", ["Adam", "SGD", "Muon"])
def test_keras_optimizers_train_through_distributed(mirrored, name):
    make = getattr(keras.optimizers, name)
    rate = {"SGD": 0.1, "Lion": 0.001}.get(name, 0.01)
    model, optimizer, initial, history = _fit(
        mirrored,
        lambda: tfso.distributed(make(learning_rate=rate), compression="natural"),
        epochs=2,
    )
    assert isinstance(optimizer, make)
    assert history.history["loss"][-1] < 0.9 * initial
    first, second = replica_values(model.weights[0])
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "compression", ["sign", C.TopK(0.1), "qsgd", C.PowerSGD(rank=2), "randomk"]
)
def test_bytes_per_step_are_the_wire_tensors(mirrored, compression):
    _, optimizer, _, history = _fit(
        mirrored,
        lambda: tfso.distributed(keras.optimizers.SGD(0.01), compression=compression),
        epochs=1,
        callbacks=[tfso.callbacks.CommunicationStats()],
    )
    compressor = optimizer.communication.compression
    # The wires, and one element of the step's first buffer (int32 words of a
    # gather, float32 of an all-reduce here): each replica's "not finite" flag.
    flag_bytes = 4
    expected = flag_bytes + sum(
        compressor.wire_bytes(tuple(v.shape)) for v in optimizer._trainable_variables
    )
    stats = optimizer.communication_stats()
    assert stats["bytes_per_step"] == expected
    assert stats["bytes_total"] == 8 * expected
    rounds_per_step = 2 if isinstance(compressor, C.PowerSGD) else 1
    assert stats["rounds"] == 8 * rounds_per_step
    assert history.history["comm_bytes_per_step"] == [expected]
    assert history.history["comm_rounds"] == [8 * rounds_per_step]


def test_sign_majority_vote_is_at_most_a_thirtieth_of_float32(mirrored):
    """One bit per element, no allowance: sizes of whole int32 words, so the
    only overhead is the finite flag (4 bytes) and one word of the 10 biases."""
    x = np.random.default_rng(0).normal(size=(64, 64)).astype("float32")
    y = np.zeros((64,), "int32")
    with mirrored.scope():
        model = keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dense(10)]
        )
        optimizer = tfso.SignSGD(1e-3)
        model.compile(
            optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(True)
        )
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    stats = optimizer.communication_stats()
    assert stats["bytes_per_step"] * 30 <= stats["float32_bytes_per_step"]
    assert stats["bytes_per_step"] == (64 * 256 + 256 + 256 * 10) // 8 + 4 + 4


def _apply_on_replicas(strategy, optimizer, variable, gradient_fn, steps=1):
    """`steps` apply_gradients calls where replica r's gradient is gradient_fn(r, value)."""

    @tf.function
    def step():
        def replica_fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            g = gradient_fn(r, tf.convert_to_tensor(variable))
            optimizer.apply_gradients([(g, variable)])

        strategy.run(replica_fn)

    for _ in range(steps):
        step()
    return replica_values(variable)


def test_majority_vote_applies_sign_of_sum_of_signs(mirrored):
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(2, 40)).astype(np.float32)
    grads[1, :10] = -grads[0, :10]  # ties on 10 elements: sign(0) = +1
    grads[1, 10:20] = 3 * grads[0, 10:20]  # agreement
    expected_vote = np.where(np.sign(np.where(grads < 0, -1, 1)).sum(0) >= 0, 1.0, -1.0)
    table = tf.constant(grads)
    for make in (
        lambda: tfso.SignSGD(learning_rate=1.0),
        lambda: tfso.distributed(
            keras.optimizers.SGD(1.0), compression="sign", aggregation="majority_vote"
        ),
    ):
        with mirrored.scope():
            variable = keras.Variable(np.zeros(40, np.float32))
            optimizer = make()
            optimizer.build([variable])
        values = _apply_on_replicas(
            mirrored, optimizer, variable, lambda r, v: table[r]
        )
        np.testing.assert_array_equal(values[0], -expected_vote)
        np.testing.assert_array_equal(values[1], -expected_vote)


def test_signum_matches_numpy_with_per_replica_momentum(mirrored):
    """θ ← θ − lr·vote(sign(m_0), sign(m_1)), m_r ← β m_r + (1−β)·2·g_r over 12 steps."""
    a = np.array([[1.0, -2.0, 0.5, 3.0], [0.5, 1.0, -1.0, 2.0]], np.float32)
    b = np.array([[0.3, 0.1, -0.2, 0.05], [-0.4, 0.2, 0.1, -0.3]], np.float32)
    lr, beta = 0.05, 0.8
    with mirrored.scope():
        variable = keras.Variable(np.full(4, 0.7, np.float32))
        optimizer = tfso.SignSGD(learning_rate=lr, momentum=beta)
        optimizer.build([variable])
    ta, tb = tf.constant(a), tf.constant(b)
    values = _apply_on_replicas(
        mirrored, optimizer, variable, lambda r, v: ta[r] * v + tb[r], 12
    )
    theta = np.full(4, 0.7, np.float64)
    m = np.zeros((2, 4))
    for _ in range(12):
        g = a * theta + b
        m = beta * m + (1 - beta) * 2 * g  # the hook sees g/N·N: per-replica units
        votes = np.where(m < 0, -1, 1).sum(0)
        theta = theta - lr * np.where(votes >= 0, 1.0, -1.0)
    np.testing.assert_allclose(values[0], theta, rtol=1e-6)
    momenta = replica_values(optimizer._momentums[0])
    np.testing.assert_allclose(momenta[0], m[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(momenta[1], m[1], rtol=1e-5, atol=1e-6)


def test_signsgd_single_device_matches_numpy_under_tf_function():
    x, y = regression_data(64)
    model = mlp()
    optimizer = tfso.SignSGD(learning_rate=0.01, momentum=0.9, weight_decay=0.1)
    initial = weights_of(model)
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return grads

    theta = [w.astype(np.float64) for w in initial]
    m = [np.zeros_like(t) for t in theta]
    for _ in range(15):
        # Weights before the step give the gradient; compute it in float32 like Keras.
        grads = [g.numpy().astype(np.float64) for g in step(x, y)]
        for i in range(len(theta)):
            theta[i] = theta[i] - 0.01 * 0.1 * theta[i]
            m[i] = 0.9 * m[i] + 0.1 * grads[i]
            theta[i] = theta[i] - 0.01 * np.sign(m[i])
    for got, want in zip(weights_of(model), theta):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _distinct_replica_data():
    x, y = regression_data(256)
    y = y.copy()
    y[1::2] *= -1  # the two replicas see different targets
    return x, y


def _ef_optimizer():
    return tfso.distributed(keras.optimizers.SGD(0.05), compression=C.TopK(0.2))


def _memories(optimizer):
    return [v for v in optimizer.variables if "error_feedback" in v.path]


def _resume_matches(mirrored, original, restored, x, y):
    for model in (original, restored):
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(weights_of(original), weights_of(restored)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_memories(original.optimizer), _memories(restored.optimizer)):
        np.testing.assert_array_equal(a.replica_values(), b.replica_values())


def test_error_feedback_memory_is_per_replica_and_survives_keras_save(
    mirrored, tmp_path
):
    x, y = _distinct_replica_data()
    model, optimizer, _, _ = _fit(mirrored, _ef_optimizer, epochs=2, x=x, y=y)
    memories = _memories(optimizer)
    assert optimizer.communication.uses_error_feedback and len(memories) == 4
    stacked = memories[0].replica_values()
    assert stacked.shape == (2, 8, 16) and not np.allclose(stacked[0], stacked[1])
    path = str(tmp_path / "model.keras")
    model.save(path)
    with mirrored.scope():
        loaded = keras.models.load_model(path)
    assert type(loaded.optimizer).__name__ == "DistributedSGD"
    assert loaded.optimizer.communication.compression.ratio == 0.2
    np.testing.assert_array_equal(
        _memories(loaded.optimizer)[0].replica_values(), stacked
    )
    _resume_matches(mirrored, model, loaded, x, y)


def test_error_feedback_memory_survives_tf_checkpoint(mirrored, tmp_path):
    x, y = _distinct_replica_data()
    model, optimizer, _, _ = _fit(mirrored, _ef_optimizer, epochs=2, x=x, y=y)
    prefix = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    with mirrored.scope():
        fresh = mlp(seed=5)
        fresh_optimizer = _ef_optimizer()
        fresh.compile(optimizer=fresh_optimizer, loss="mse")
        fresh_optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh_optimizer).restore(
        prefix
    ).assert_consumed()
    for a, b in zip(_memories(optimizer), _memories(fresh_optimizer)):
        np.testing.assert_array_equal(a.replica_values(), b.replica_values())
    _resume_matches(mirrored, model, fresh, x, y)


def test_a_nan_gradient_does_not_poison_error_feedback(mirrored):
    with mirrored.scope():
        variable = keras.Variable(np.zeros(8, np.float32))
        optimizer = tfso.distributed(
            keras.optimizers.SGD(0.1), compression="scaled_sign"
        )
        optimizer.build([variable])
    good = tf.constant(np.linspace(-1, 1, 8, dtype=np.float32))
    _apply_on_replicas(mirrored, optimizer, variable, lambda r, v: good)
    memory = _memories(optimizer)[0]
    before = memory.replica_values()
    bad = tf.constant([np.nan] + [0.0] * 7, tf.float32)
    _apply_on_replicas(mirrored, optimizer, variable, lambda r, v: bad)
    np.testing.assert_array_equal(memory.replica_values(), before)


def test_config_round_trips_and_resolves_by_registered_name():
    optimizer = tfso.distributed(
        keras.optimizers.Adam(0.003, beta_1=0.8),
        compression=C.QSGD(bits=4),
        error_feedback=True,
    )
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(clone) is type(optimizer) and isinstance(clone, keras.optimizers.Adam)
    assert (
        clone.beta_1 == 0.8
        and clone.communication.compression.bits == 4
        and clone.communication.error_feedback is True
    )
    by_name = keras.optimizers.get("tf_secondorder>DistributedLion")
    assert isinstance(by_name, keras.optimizers.Lion)
    signsgd = tfso.SignSGD.from_config(tfso.SignSGD(momentum=0.5).get_config())
    assert (
        signsgd.communication.aggregation == "majority_vote" and signsgd.momentum == 0.5
    )


@pytest.mark.parametrize(
    "make, argument",
    [
        (
            lambda: tfso.distributed(keras.optimizers.Adam(), compression="zip"),
            "compression",
        ),
        (lambda: tfso.Shampoo(compression="gzip"), "compression"),
        (
            lambda: tfso.distributed(
                "adam", compression="qsgd", aggregation="majority_vote"
            ),
            "aggregation",
        ),
        (lambda: tfso.SignSGD(compression=None), "aggregation"),
        (lambda: tfso.SignSGD(aggregation="median"), "aggregation"),
        (
            lambda: tfso.distributed("sgd", compression="topk", error_feedback="yes"),
            "error_feedback",
        ),
        (lambda: tfso.distributed("sgd", compression=C.TopK(ratio=1.5)), "ratio"),
        (lambda: tfso.distributed("sgd", compression=C.RandomK(ratio=0)), "ratio"),
        (lambda: tfso.distributed("sgd", compression=C.PowerSGD(rank=0)), "rank"),
        (lambda: tfso.SignSGD(momentum=1.0), "momentum"),
        (lambda: tfso.distributed(object()), "optimizer"),
    ],
)
def test_bad_input_names_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"`{argument}"):
        make()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: tfso.distributed(keras.optimizers.SGD(0.1)), 0.8),
        (lambda: tfso.distributed(keras.optimizers.SGD(0.1), compression="int8"), 0.8),
        (lambda: tfso.Shampoo(0.1), 0.9),
    ],
    ids=["keras_sum", "int8", "shampoo"],
)
def test_gradients_of_unknown_static_shape(mirrored, make, expected):
    # A table sliced to a variable sequence length (keras-hub's position
    # embedding) has gradients whose static shape is unknown.
    with mirrored.scope():
        variable = tf.Variable(tf.ones((3, 4)))
        optimizer = make()
        optimizer.build([variable])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def step(flat):
        def replica_fn():
            grad = tf.reshape(flat, [-1, 4])
            assert grad.shape.as_list() == [None, 4]
            optimizer.apply_gradients([(grad, variable)])

        mirrored.run(replica_fn)

    step(tf.ones([12]))
    # Keras sums the replicas' gradients (fit divides the loss by the
    # replica count; this loop does not): SGD moves by lr * 2 (int8 carries
    # 1.0 exactly). Shampoo's first step is its grafted Adam step, lr per
    # element whatever the gradient's scale.
    for value in mirrored.experimental_local_results(variable):
        np.testing.assert_allclose(value.numpy(), np.full((3, 4), expected), rtol=1e-5)


def test_shampoo_gradient_of_unknown_static_shape_without_a_strategy():
    # Without a strategy Keras calls no reduction: Shampoo's own blocking
    # must take the variable's shape.
    variable = tf.Variable(tf.ones((3, 4)))
    optimizer = tfso.Shampoo(0.1)
    optimizer.build([variable])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def step(flat):
        optimizer.apply_gradients([(tf.reshape(flat, [-1, 4]), variable)])

    step(tf.ones([12]))
    np.testing.assert_allclose(variable.numpy(), np.full((3, 4), 0.9), rtol=1e-5)
