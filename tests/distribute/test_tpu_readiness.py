"""What a TPU needs, checked on CPU: collective dtypes, int32 step arithmetic,
and the sharded exchange placing each share on its own replica."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tf_secondorder.distribute import channel, compressors, sharded

# SPEC §5: all_gather accepts these; all_reduce adds bfloat16.
GATHER_DTYPES = {tf.float32, tf.float16, tf.float64, tf.int32, tf.int64}
REDUCE_DTYPES = GATHER_DTYPES | {tf.bfloat16}


@pytest.fixture
def recorded_collectives(monkeypatch):
    seen = []
    for name, kind in (("_sum", "reduce"), ("_gather", "gather")):
        original = getattr(channel.Channel, name)

        def spy(self, buffer, original=original, kind=kind):
            seen.append((kind, buffer.dtype))
            return original(self, buffer)

        monkeypatch.setattr(channel.Channel, name, spy)
    return seen


@pytest.mark.parametrize("name", compressors.names())
def test_compressed_step_uses_only_collective_dtypes(
    mirrored, recorded_collectives, name
):
    with mirrored.scope():
        variables = [
            keras.Variable(np.ones((6, 5), "float32")),
            keras.Variable(np.ones(5, "float32")),
        ]
        opt = tfso.distributed(keras.optimizers.SGD(0.1), compression=name)
        opt.build(variables)

    @tf.function
    def step():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            scale = tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32)
            opt.apply([scale * tf.ones((6, 5)), -scale * tf.ones(5)], variables)

        mirrored.run(replica_fn)

    step()
    assert recorded_collectives, name
    for kind, dtype in recorded_collectives:
        allowed = REDUCE_DTYPES if kind == "reduce" else GATHER_DTYPES
        assert dtype in allowed, (name, kind, dtype)


def _ops(graph_def):
    yield from graph_def.node
    for function in graph_def.library.function:
        yield from function.node_def


@pytest.mark.parametrize("make", [tfso.Shampoo, tfso.SOAP, tfso.SignSGD])
def test_step_arithmetic_is_int32(make):
    variables = [keras.Variable(np.ones((6, 5), "float32"))]
    opt = make(statistics_frequency=2) if make is not tfso.SignSGD else make()
    opt.build(variables)
    apply = tf.function(lambda g: opt.apply([g], variables))
    graph = apply.get_concrete_function(tf.TensorSpec((6, 5))).graph.as_graph_def()
    modular = [n for n in _ops(graph) if n.op in ("FloorMod", "Mod", "TruncateMod")]
    if make is not tfso.SignSGD:
        assert modular  # the refresh / statistics schedule
    for node in modular:
        assert node.attr["T"].type != tf.int64.as_datatype_enum, node.name


def test_run_sharded_places_each_share_and_gathers_all(mirrored):
    shares = [[0, 2], [1]]
    shapes = {0: (2, 3), 1: (4,), 2: (1, 1)}
    devices = []

    def compute(items):
        device = tf.constant(0.0).device
        devices.append((tuple(items), device))
        values = [tf.fill(shapes[i], float(10 * i + 1)) for i in items]
        return values, tf.constant(len(items), tf.int64)

    @tf.function
    def exchange():
        with mirrored.scope():  # its cross-replica context
            return sharded.run_sharded(mirrored, shares, shapes, compute, "float32")

    results, failures = exchange()
    for i, shape in shapes.items():
        np.testing.assert_array_equal(results[i].numpy(), np.full(shape, 10 * i + 1.0))
    assert float(failures.numpy()) == 3.0
    assert [items for items, _ in devices] == [(0, 2), (1,)]
    assert devices[0][1].endswith("CPU:0") and devices[1][1].endswith("CPU:1")


def test_splits_work_only_for_mirrored_strategies(mirrored):
    assert sharded.splits_work(mirrored, "auto")
    assert sharded.splits_work(mirrored, True)
    assert not sharded.splits_work(mirrored, False)
    assert not sharded.splits_work(tf.distribute.get_strategy(), "auto")
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert not sharded.splits_work(one, True)
