"""COMP-AMS and 1-bit Adam: NumPy references on 2 replicas (every memory
included), alone, save → load → resume, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import regression_data, replica_values, resume_mid_run, weights_of

SHAPES = [(5,), (3, 2)]  # 11 elements: bidirectional chunks of 6 cross them


def scaled_sign(v):
    return np.mean(np.abs(v)) * np.where(v < 0, -1.0, 1.0)


def run(strategy, optimizer_fn, gradients):
    """gradients[t][r]: replica r's flat gradient at step t (what it computed;
    Keras hands the optimizer g/N)."""
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


def _split(flat):
    return np.split(flat, np.cumsum([int(np.prod(s)) for s in SHAPES])[:-1])


def reference_comp_ams(gradients, lr, warmup, b1=0.9, b2=0.999, eps=1e-7):
    """Steps t <= warmup: AMSGrad on the mean gradient. Then, per tensor:
    p_i = g_i + e_i, c_i = scaled sign of p_i, e_i = p_i − c_i; AMSGrad on
    the mean of the c_i."""
    n, d = len(gradients[0]), gradients[0][0].size
    e = [np.zeros(d) for _ in range(n)]
    m, v, v_max, x = (np.zeros(d) for _ in range(4))
    for t, step in enumerate(gradients, start=1):
        sent = []
        for i, g in enumerate(step):
            if t <= warmup:
                sent.append(g)
                continue
            p = g + e[i]
            c = np.concatenate([scaled_sign(part) for part in _split(p)])
            e[i] = p - c
            sent.append(c)
        mean = np.mean(sent, axis=0)
        m = b1 * m + (1 - b1) * mean
        v = b2 * v + (1 - b2) * mean**2
        v_max = np.maximum(v_max, v)
        x = x - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v_max) + eps)
    return x, e


@pytest.mark.parametrize("warmup", [0, 2])
def test_comp_ams_matches_numpy_on_two_replicas(mirrored, rng, warmup):
    gradients = [[rng.normal(size=11) for _ in range(2)] for _ in range(6)]
    variables, optimizer = run(
        mirrored,
        lambda: tfso.CompAMS(
            0.01, compression="scaled_sign", compression_warmup_steps=warmup
        ),
        gradients,
    )
    want, memories = reference_comp_ams(gradients, 0.01, warmup)
    got = np.concatenate([v.numpy().reshape(-1) for v in variables])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    per_replica = [
        np.concatenate(parts)
        for parts in zip(
            *[
                [r.reshape(-1) for r in m.replica_values()]
                for m in optimizer.communicator.aggregator.memories
            ]
        )
    ]
    for r in range(2):
        np.testing.assert_allclose(per_replica[r], memories[r], rtol=1e-5, atol=1e-6)
    # Error feedback matters: without memories the weights land elsewhere.
    no_memory, _ = run(
        mirrored,
        lambda: tfso.CompAMS(
            0.01,
            compression="scaled_sign",
            error_feedback=False,
            compression_warmup_steps=warmup,
        ),
        gradients,
    )
    other = np.concatenate([v.numpy().reshape(-1) for v in no_memory])
    assert np.abs(other - want).max() > 1e-4


def chunked_exchange(codes_of, inputs, worker, server):
    """The bidirectional exchange with memories (NumPy), one step."""
    n, d = len(inputs), inputs[0].size
    length = -(-d // n)
    codes = []
    for i, x in enumerate(inputs):
        p = np.pad(x + worker[i], (0, n * length - d)).reshape(n, length)
        c = np.stack([codes_of(chunk) for chunk in p])
        codes.append(c)
        worker[i] = (p - c).reshape(-1)[:d]
    replies = []
    for r in range(n):
        q = np.mean([codes[i][r] for i in range(n)], axis=0) + server[r]
        z = codes_of(q)
        server[r] = q - z
        replies.append(z)
    return np.concatenate(replies)[:d]


def gathered_mean(codes_of, inputs, worker, _server):
    """Error feedback per replica, the mean of the decoded codes (NumPy)."""
    sent = []
    for i, x in enumerate(inputs):
        p = x + worker[i]
        c = np.concatenate([codes_of(part) for part in _split(p)])
        worker[i] = p - c
        sent.append(c)
    return np.mean(sent, axis=0)


def reference_one_bit_adam(
    gradients,
    lr,
    freeze,
    every=None,
    exchange=chunked_exchange,
    b1=0.9,
    b2=0.999,
    eps=1e-7,
):
    """Adam on the mean gradient while t ≤ freeze (and every `every` steps
    after, as a K-step variance update); otherwise each replica's momentum
    β1·m + (1 − β1)·g_i goes through `exchange`."""
    n, d = len(gradients[0]), gradients[0][0].size
    length = -(-d // n)
    worker = [np.zeros(d) for _ in range(n)]
    server = [np.zeros(length) for _ in range(n)]
    m, v, x = np.zeros(d), np.zeros(d), np.zeros(d)
    variance_steps = 0
    for t, step in enumerate(gradients, start=1):
        full = t <= freeze or (every is not None and (t - freeze) % every == 0)
        if full:
            mean = np.mean(step, axis=0)
            decay = b2 if t <= freeze else b2**every
            m = b1 * m + (1 - b1) * mean
            v = decay * v + (1 - decay) * mean**2
            variance_steps += 1 if t <= freeze else every
        else:
            m = exchange(
                scaled_sign, [b1 * m + (1 - b1) * g for g in step], worker, server
            )
        step_size = lr * np.sqrt(1 - b2**variance_steps) / (1 - b1**t)
        x = x - step_size * m / (np.sqrt(v) + eps)
    return x, worker, server


def test_one_bit_adam_defaults_match_numpy_on_two_replicas(mirrored, rng):
    """Block signs (a scale per 256: one per tensor here) gathered, with
    error feedback per replica."""
    gradients = [[rng.normal(size=11) for _ in range(2)] for _ in range(9)]
    variables, optimizer = run(
        mirrored,
        lambda: tfso.OneBitAdam(0.01, freeze_step=3, variance_update_every=4),
        gradients,
    )
    want, worker, _ = reference_one_bit_adam(gradients, 0.01, 3, 4, gathered_mean)
    got = np.concatenate([v.numpy().reshape(-1) for v in variables])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    memories = [
        np.concatenate(parts)
        for parts in zip(
            *[
                [r.reshape(-1) for r in m.replica_values()]
                for m in optimizer.communicator.aggregator.memories
            ]
        )
    ]
    for r in range(2):
        np.testing.assert_allclose(memories[r], worker[r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every", [None, 3])
def test_one_bit_adam_bidirectional_matches_numpy_on_two_replicas(mirrored, rng, every):
    gradients = [[rng.normal(size=11) for _ in range(2)] for _ in range(9)]
    variables, optimizer = run(
        mirrored,
        lambda: tfso.OneBitAdam(
            0.01,
            freeze_step=3,
            variance_update_every=every,
            compression="scaled_sign",
            aggregation="bidirectional",
        ),
        gradients,
    )
    want, worker, server = reference_one_bit_adam(gradients, 0.01, 3, every)
    got = np.concatenate([v.numpy().reshape(-1) for v in variables])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    aggregator = optimizer.communicator.aggregator
    memories = [
        np.concatenate(parts)
        for parts in zip(
            *[[r.reshape(-1) for r in m.replica_values()] for m in aggregator.memories]
        )
    ]
    servers = aggregator.inner.memory.replica_values()
    for r in range(2):
        np.testing.assert_allclose(memories[r], worker[r], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(servers[r], server[r], rtol=1e-5, atol=1e-6)
    for variable in variables:
        a, b = replica_values(variable)
        np.testing.assert_array_equal(a, b)
    # Full precision: 3 warm-up steps (and every 3rd after when set), each
    # one all-reduce more than the compressed exchange's two collectives.
    full = 3 + (2 if every else 0)
    assert optimizer.communication_stats()["rounds"] == 2 * 9 + full


def test_one_bit_adam_alone_is_adam_then_frozen_variance():
    x, y = regression_data(64)
    finals = {}
    for name, make in {
        "adam": lambda: keras.optimizers.Adam(0.01),
        "one_bit": lambda: tfso.OneBitAdam(0.01, freeze_step=1000),
    }.items():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        model.compile(optimizer=make(), loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        finals[name] = weights_of(model)
    for a, b in zip(finals["adam"], finals["one_bit"]):
        # Keras's Adam formula with its ops in another order (m + (g − m)(1 − β1)
        # against β1·m + (1 − β1)·g, and so for v): each step's update, at most
        # lr·(1 − β1)/√(1 − β2) ≈ 3.2·lr per weight (Kingma & Ba), differs by
        # a few roundings (≤ 10u relative); and w − update rounds to w's
        # spacing, so two updates a fraction of an ulp apart can land one
        # ulp (≤ 2u·|w|) apart. 8 steps add up.
        u, lr, steps = 2.0**-24, 0.01, 8
        per_step = 3.2 * lr * 10 * u + 2 * u * np.max(np.abs(a))
        np.testing.assert_allclose(a, b, rtol=0, atol=steps * per_step)


@pytest.mark.parametrize(
    "make",
    [
        # Warm-ups shorter than the 4 steps before the save: memories are in
        # use when it is written.
        lambda: tfso.CompAMS(0.01, compression_warmup_steps=2),
        lambda: tfso.OneBitAdam(0.01, freeze_step=3, variance_update_every=4),
    ],
    ids=["comp_ams", "one_bit_adam"],
)
def test_save_load_resume_equals_uninterrupted(mirrored, tmp_path, make):
    def restored(net):
        memories = net.optimizer.communicator.aggregator.memories
        assert any(
            np.abs(m.replica_values()[0] - m.replica_values()[1]).max() > 0
            for m in memories
        )

    resumed, uninterrupted = resume_mid_run(
        mirrored, make, tmp_path / "resume.keras", restored
    )
    # The same ops on the same devices from the same state: equal bits.
    for a, b in zip(weights_of(resumed), weights_of(uninterrupted)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: tfso.CompAMS(beta1=1.0), "beta1"),
        (lambda: tfso.CompAMS(epsilon=0.0), "epsilon"),
        (lambda: tfso.CompAMS(compression="gzip"), "compression"),
        (lambda: tfso.OneBitAdam(freeze_step=0), "freeze_step"),
        (lambda: tfso.OneBitAdam(variance_update_every=0), "variance_update_every"),
        (
            lambda: tfso.OneBitAdam(compression_warmup_steps=5),
            "compression_warmup_steps",
        ),
        (lambda: tfso.OneBitAdam(average_every=4), "average_every"),
        (lambda: tfso.OneBitAdam(learning_rate=float("nan")), "learning_rate"),
    ],
)
def test_bad_input_names_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"^`{argument}`"):
        make()


def test_configs_round_trip():
    for optimizer in (
        tfso.CompAMS(0.002, beta2=0.99, compression=tfso.compression.TopK(0.05)),
        tfso.OneBitAdam(0.002, freeze_step=7, variance_update_every=9),
    ):
        clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
        assert type(clone) is type(optimizer)
        assert clone.get_config() == optimizer.get_config()
    assert keras.optimizers.get("tf_secondorder>OneBitAdam").freeze_step == 32


def test_comp_ams_warms_up_in_full_precision_by_default():
    assert tfso.CompAMS().communication.compression_warmup_steps == 32
    uncompressed = tfso.CompAMS(compression=None).communication
    assert uncompressed.compression_warmup_steps == 0
    # Only the default steps aside: an explicit warm-up without compression
    # is still an error.
    with pytest.raises(ValueError, match="^`compression_warmup_steps`"):
        tfso.CompAMS(compression=None, compression_warmup_steps=5)
    # An explicit value, also from a saved config, is kept.
    config = tfso.CompAMS(compression_warmup_steps=0).get_config()
    assert config["compression_warmup_steps"] == 0
    assert tfso.CompAMS.from_config(config).communication.compression_warmup_steps == 0
