"""Bidirectional compression with worker and server memories."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import (
    replica_values,
    resume_mid_run,
    weights_of,
)
from tf_secondorder.compat import testing

SHAPES = [(5,), (3, 2)]  # 11 elements: chunks of 6 cross the variables


def scaled_sign(v):
    return np.mean(np.abs(v)) * np.where(v < 0, -1.0, 1.0)


def bfloat16(v):
    """Round to nearest even bfloat16 (8 bits of mantissa), in NumPy."""
    bits = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def reference(gradients, lr, memory=True, compress=scaled_sign):
    """NumPy: gradients[t][i] is replica i's flat gradient at step t."""
    n, d = len(gradients[0]), gradients[0][0].size
    length = -(-d // n)
    worker = [np.zeros(d) for _ in range(n)]
    server = [np.zeros(length) for _ in range(n)]
    weights = np.zeros(d)
    for step in gradients:
        codes = []
        for i, x in enumerate(step):
            p = np.pad(x + worker[i], (0, n * length - d)).reshape(n, length)
            c = np.stack([compress(chunk) for chunk in p])
            codes.append(c)
            if memory:
                worker[i] = (p - c).reshape(-1)[:d]
        replies = []
        for r in range(n):
            q = np.mean([codes[i][r] for i in range(n)], axis=0) + server[r]
            z = compress(q)
            if memory:
                server[r] = q - z
            replies.append(z)
        weights -= lr * np.concatenate(replies)[:d]
    return weights, worker, server


def run(
    strategy,
    gradients,
    lr,
    compression="scaled_sign",
    aggregation="bidirectional",
    **options,
):
    """Plain SGD on variables of SHAPES: step t hands replica i the flat
    gradient gradients[t][i]."""
    with strategy.scope():
        variables = [keras.Variable(np.zeros(s, "float32")) for s in SHAPES]
        optimizer = tfso.distributed(
            keras.optimizers.SGD(lr),
            compression=compression,
            aggregation=aggregation,
            **options,
        )
        optimizer.build(variables)
    n = strategy.num_replicas_in_sync
    sizes = [int(np.prod(s)) for s in SHAPES]

    @tf.function
    def step(per_replica):
        def replica_step(flat):
            # Keras hands the hook g_i / N (the loss is pre-scaled).
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


@pytest.mark.parametrize("memory", [True, False])
def test_matches_numpy_reference_of_both_memories(mirrored, rng, memory):
    gradients = [[rng.normal(size=11) for _ in range(2)] for _ in range(5)]
    lr = 0.1
    with testing.count_hook_calls() as calls:
        variables, optimizer = run(mirrored, gradients, lr, error_feedback=memory)
    assert calls["all_to_all"] > 0  # the real collective
    weights, worker, server = reference(gradients, lr, memory)
    got = np.concatenate([v.numpy().reshape(-1) for v in variables])
    np.testing.assert_allclose(got, weights, rtol=1e-5, atol=1e-6)
    for variable in variables:  # every replica applied the same update
        a, b = replica_values(variable)
        np.testing.assert_array_equal(a, b)
    if memory:
        memories = [
            np.concatenate(parts)
            for parts in zip(
                *[
                    [r.reshape(-1) for r in m.replica_values()]
                    for m in optimizer.communicator.aggregator.memories
                ]
            )
        ]
        for i in range(2):
            np.testing.assert_allclose(memories[i], worker[i], rtol=1e-5, atol=1e-6)
        servers = optimizer.communicator.aggregator.inner.memory.replica_values()
        for r in range(2):
            np.testing.assert_allclose(servers[r], server[r], rtol=1e-5, atol=1e-6)
    else:
        assert optimizer.communicator.aggregator.memory is None
    # the memories matter: the other variant lands elsewhere
    other, _, _ = reference(gradients, lr, not memory)
    assert np.abs(other - weights).max() > 1e-3


def test_bfloat16_travels_bit_for_bit(mirrored, rng):
    """bfloat16 wires cannot be all-gathered on CPU collectives; they travel as
    int32 words. The result is the NumPy exchange with bfloat16 rounding
    (float32 sums of two bfloat16 values: exact to float32's rounding)."""
    gradients = [[rng.normal(size=11) for _ in range(2)] for _ in range(4)]
    variables, optimizer = run(mirrored, gradients, 0.1, compression="bf16")
    weights, _, _ = reference(gradients, 0.1, compress=bfloat16)
    got = np.concatenate([v.numpy().reshape(-1) for v in variables])
    np.testing.assert_allclose(got, weights, rtol=1e-5, atol=1e-6)
    assert (
        np.abs(weights - reference(gradients, 0.1, compress=lambda v: v)[0]).max() > 0
    )


def test_bytes_stay_linear_in_d(mirrored, rng):
    gradients = [[rng.normal(size=11) for _ in range(2)]]
    _, optimizer = run(mirrored, gradients, 0.1)
    stats = optimizer.communication_stats()
    # chunk of 6: one float + one int32 word; all_to_all of 2 chunks, then
    # an all_gather of this replica's one chunk. The all_to_all, the step's
    # first collective, also carries a "not finite" flag (an int32) per row.
    chunk, flags = 8, 2 * 4
    assert stats["bytes_per_step"] == 2 * chunk + flags + chunk
    assert stats["bytes_received_per_step"] == 2 * chunk + flags + 2 * chunk


def test_fit_resume_equals_uninterrupted(mirrored, tmp_path):
    def optimizer():
        return tfso.distributed(
            keras.optimizers.SGD(0.05),
            compression="scaled_sign",
            aggregation="bidirectional",
        )

    def restored(net):
        servers = net.optimizer.communicator.aggregator.inner.memory.replica_values()
        assert np.abs(servers[0] - servers[1]).max() > 0  # per replica

    resumed, uninterrupted = resume_mid_run(
        mirrored, optimizer, tmp_path / "bidirectional.keras", restored
    )
    for a, b in zip(weights_of(resumed), weights_of(uninterrupted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compression", [None, "powersgd", "randomk"])
def test_bad_compressor_is_rejected(compression):
    with pytest.raises(ValueError, match="bidirectional"):
        tfso.distributed("sgd", compression=compression, aggregation="bidirectional")
