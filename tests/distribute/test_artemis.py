"""Artemis: bidirectional compression with memories that learn the gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.distribute.test_bidirectional import bfloat16, run, scaled_sign
from tests.helpers import (
    replica_values,
    resume_mid_run,
    weights_of,
)
from tf_secondorder.compat import testing
from tf_secondorder.distribute.artemis import default_memory_rate, participants


def reference(gradients, lr, alpha, masks=None, compress=scaled_sign):
    """NumPy Artemis with the server split in N chunks: gradients[t][i] is
    replica i's flat gradient at step t, masks[t][i] whether it takes part.
    Returns the weights, every worker memory h_i and the server memory h̄."""
    n, d = len(gradients[0]), gradients[0][0].size
    length = -(-d // n)
    workers = [np.zeros(d) for _ in range(n)]
    server = np.zeros(n * length)
    weights = np.zeros(d)
    for t, step in enumerate(gradients):
        active = [True] * n if masks is None else masks[t]
        total = np.zeros(n * length)
        for i, g in enumerate(step):
            difference = np.pad(g - workers[i], (0, n * length - d))
            delta = np.concatenate([compress(c) for c in difference.reshape(n, length)])
            if active[i]:
                workers[i] = workers[i] + alpha * delta[:d]
                total += delta
        total[d:] = 0.0  # no server learns its padding
        estimate = server + total / n
        server = server + alpha * total / n
        reply = np.concatenate([compress(c) for c in estimate.reshape(n, length)])
        weights -= lr * reply[:d]
    return weights, workers, server


def memories(optimizer):
    aggregator = optimizer.communicator.aggregator
    return (
        [np.asarray(v) for v in aggregator.worker_memory.replica_values()],
        [np.asarray(v) for v in aggregator.server_memory.replica_values()],
    )


def flat_weights(variables):
    return np.concatenate([v.numpy().reshape(-1) for v in variables])


# Float32 runs every operation of the float64 reference once per step, with
# at most ~20 roundings of values of size ≤ 10 (|g| ≲ 3, lr·steps ≲ 1):
# errors stay below 1e-5 relative, far under the differences asserted.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_matches_numpy_reference(mirrored, rng, alpha):
    gradients = [[rng.normal(size=11) for _ in range(2)] for _ in range(6)]
    options = {} if alpha is None else {"memory_rate": alpha}
    with testing.count_hook_calls() as calls:
        variables, optimizer = run(
            mirrored, gradients, 0.1, aggregation="artemis", **options
        )
    assert calls["all_to_all"] > 0  # the real collective
    used = 1.0 if alpha is None else alpha  # scaled sign is biased: α = 1
    assert optimizer.communicator.aggregator.alpha == used
    weights, workers, server = reference(gradients, 0.1, used)
    np.testing.assert_allclose(flat_weights(variables), weights, **TOLERANCE)
    for variable in variables:  # every replica applied the same update
        a, b = replica_values(variable)
        np.testing.assert_array_equal(a, b)
    got_workers, got_servers = memories(optimizer)
    for i in range(2):
        np.testing.assert_allclose(got_workers[i][:11], workers[i], **TOLERANCE)
        assert not got_workers[i][11:].any()  # padding
    np.testing.assert_allclose(np.concatenate(got_servers), server, **TOLERANCE)
    # h̄ is the mean of the replicas' memories
    np.testing.assert_allclose(
        np.concatenate(got_servers)[:11], np.mean(workers, axis=0), **TOLERANCE
    )
    # Not the error-feedback exchange: the same gradients land elsewhere.
    ef, _ = run(mirrored, gradients, 0.1, aggregation="bidirectional")
    assert np.abs(flat_weights(ef) - weights).max() > 1e-3


def test_partial_participation_matches_reference(mirrored, rng):
    steps, p = 12, 0.5
    gradients = [[rng.normal(size=11) for _ in range(2)] for _ in range(steps)]
    masks = [participants(tf.constant(t, tf.int64), 2, p).numpy() for t in range(steps)]
    counts = np.sum(masks, axis=0)
    assert 0 < counts.min() and counts.max() < steps  # replicas left out, not all
    variables, optimizer = run(
        mirrored,
        gradients,
        0.1,
        aggregation="artemis",
        memory_rate=0.5,
        participation=p,
    )
    weights, workers, _ = reference(gradients, 0.1, 0.5, masks)
    np.testing.assert_allclose(flat_weights(variables), weights, **TOLERANCE)
    got_workers, _ = memories(optimizer)
    for i in range(2):
        np.testing.assert_allclose(got_workers[i][:11], workers[i], **TOLERANCE)
    full, _, _ = reference(gradients, 0.1, 0.5)
    assert np.abs(full - weights).max() > 1e-3


def test_participation_draw():
    """Each replica takes part with probability p, independently of the step
    number's parity; the draw is a function of the step alone."""
    masks = np.stack(
        [participants(tf.constant(t, tf.int64), 4, 0.25).numpy() for t in range(800)]
    )
    # 3200 Bernoulli(1/4) draws: standard deviation of the mean 0.0077.
    assert abs(masks.mean() - 0.25) < 0.04
    assert abs(masks[::2].mean() - masks[1::2].mean()) < 0.08
    again = participants(tf.constant(17, tf.int64), 4, 0.25).numpy()
    np.testing.assert_array_equal(again, masks[17])
    assert participants(tf.constant(3, tf.int64), 4, 1.0).numpy().all()


def test_memory_learns_each_replicas_gradient(mirrored, rng):
    """With gradients that differ across replicas and stay fixed, h_i → g_i,
    so what a replica sends, C(g_i − h_i), shrinks to nothing (the DIANA
    property error feedback lacks); bf16 wires, α = 1/2."""
    fixed = [rng.normal(size=11) * (1 + 3 * i) for i in range(2)]
    gradients = [fixed] * 12
    _, optimizer = run(
        mirrored,
        gradients,
        0.01,
        compression="bf16",
        aggregation="artemis",
        memory_rate=0.5,
    )
    got_workers, _ = memories(optimizer)
    for i in range(2):
        # ‖g − h‖ halves each step: 2^−12 of ‖g‖, plus bf16's rounding.
        gap = np.abs(got_workers[i][:11] - fixed[i]).max()
        assert gap < 2e-3 * np.abs(fixed[i]).max()
    _, workers, _ = reference(gradients, 0.01, 0.5, compress=bfloat16)
    for i in range(2):
        np.testing.assert_allclose(got_workers[i][:11], workers[i], **TOLERANCE)


def test_default_memory_rate_follows_the_compressor():
    qsgd = tfso.compression.QSGD(bits=4, bucket_size=512)
    omega = min(512 / 49, np.sqrt(512) / 7)  # s = 7 levels
    assert default_memory_rate(qsgd, (5000,)) == pytest.approx(1 / (2 * (omega + 1)))
    assert default_memory_rate(tfso.compression.get("natural"), (10,)) == 1 / (
        2 * (1 + 1 / 8)
    )
    assert default_memory_rate(tfso.compression.get("topk"), (10,)) == 1.0
    dithering = tfso.compression.Natural(levels=4)
    assert default_memory_rate(dithering, (10,)) is None


def test_fit_resume_equals_uninterrupted(mirrored, tmp_path):
    def optimizer():
        return tfso.distributed(
            keras.optimizers.SGD(0.05),
            compression="scaled_sign",
            aggregation="artemis",
            memory_rate=0.5,
            participation=0.75,
        )

    def restored(net):
        aggregator = net.optimizer.communicator.aggregator
        assert (aggregator.memory_rate, aggregator.participation) == (0.5, 0.75)
        workers, _ = memories(net.optimizer)
        assert np.abs(workers[0] - workers[1]).max() > 0  # per replica

    resumed, uninterrupted = resume_mid_run(
        mirrored, optimizer, tmp_path / "artemis.keras", restored
    )
    for a, b in zip(weights_of(resumed), weights_of(uninterrupted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "options, argument",
    [
        ({"compression": "sign"}, "aggregation"),
        ({"compression": None}, "aggregation"),
        ({"compression": "randomk"}, "aggregation"),
        ({"compression": "topk", "error_feedback": True}, "error_feedback"),
        ({"compression": "topk", "memory_rate": 0.0}, "memory_rate"),
        ({"compression": "topk", "memory_rate": 1.5}, "memory_rate"),
        ({"compression": "topk", "participation": 0.0}, "participation"),
        (
            {"compression": tfso.compression.Natural(levels=4)},
            "memory_rate",
        ),
    ],
)
def test_bad_options_are_rejected(options, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        tfso.distributed("sgd", aggregation="artemis", **options)


@pytest.mark.parametrize("option", [{"memory_rate": 0.5}, {"participation": 0.5}])
def test_artemis_options_need_artemis(option):
    with pytest.raises(ValueError, match="unless `aggregation` is 'artemis'"):
        tfso.distributed(
            "sgd", compression="topk", aggregation="bidirectional", **option
        )
