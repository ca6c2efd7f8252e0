"""What a TPU needs, checked on CPU: collective dtypes, int32 step arithmetic,
and the sharded exchange placing each share on its own replica."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tf_secondorder.distribute import sharding

# SPEC §5: all_gather accepts these; all_reduce adds bfloat16.
GATHER_DTYPES = {tf.float32, tf.float16, tf.float64, tf.int32, tf.int64}
REDUCE_DTYPES = GATHER_DTYPES | {tf.bfloat16}


@pytest.fixture
def recorded_collectives(monkeypatch):
    """(kind, dtype) of every tensor handed to a replica-context collective,
    spied on TensorFlow's public ReplicaContext methods."""
    seen = []
    for name, kind in (("all_reduce", "reduce"), ("all_gather", "gather")):
        original = getattr(tf.distribute.ReplicaContext, name)

        def spy(self, *args, original=original, kind=kind, **kwargs):
            # all_reduce(reduce_op, value, ...), all_gather(value, axis, ...)
            position = 1 if kind == "reduce" else 0
            value = kwargs["value"] if "value" in kwargs else args[position]
            seen.extend((kind, t.dtype) for t in tf.nest.flatten(value))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(tf.distribute.ReplicaContext, name, spy)
    return seen


@pytest.mark.parametrize("name", tfso.compression.names())
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


@pytest.mark.parametrize(
    "make, scheduled",
    [(tfso.Shampoo, True), (tfso.SOAP, True), (tfso.SignSGD, False)],
)
def test_step_arithmetic_is_int32(make, scheduled):
    variables = [keras.Variable(np.ones((6, 5), "float32"))]
    opt = make(statistics_frequency=2) if scheduled else make()
    opt.build(variables)
    apply = tf.function(lambda g: opt.apply([g], variables))
    graph = apply.get_concrete_function(tf.TensorSpec((6, 5))).graph.as_graph_def()
    ops = list(_ops(graph))
    # The step number is computed in int32 from Keras's int64 counter.
    to_int32 = [
        n
        for n in ops
        if n.op == "Cast"
        and n.attr["SrcT"].type == tf.int64.as_datatype_enum
        and n.attr["DstT"].type == tf.int32.as_datatype_enum
    ]
    assert to_int32, make.__name__
    modular = [n for n in ops if n.op in ("FloorMod", "Mod", "TruncateMod")]
    if scheduled:
        assert modular  # the refresh / statistics schedule
    else:
        assert not modular  # nothing to check below: no schedule
    for node in modular:
        assert node.attr["T"].type == tf.int32.as_datatype_enum, node.name


def test_run_sharded_places_each_share_and_gathers_all(mirrored):
    shares = [[0, 2], [1]]
    shapes = {0: (2, 3), 1: (4,), 2: (1, 1)}
    specs = {i: ((shape, "float32"),) for i, shape in shapes.items()}
    devices = []

    def compute(items):
        device = tf.constant(0.0).device
        devices.append((tuple(items), device))
        values = {i: (tf.fill(shapes[i], float(10 * i + 1)),) for i in items}
        return values, tf.constant(len(items), tf.int64)

    @tf.function
    def exchange():
        with mirrored.scope():  # its cross-replica context
            return sharding.run_sharded(mirrored, shares, specs, compute)

    results, failures = exchange()
    assert sorted(results) == sorted(shapes)
    for i, shape in shapes.items():
        (value,) = results[i]
        np.testing.assert_array_equal(value.numpy(), np.full(shape, 10 * i + 1.0))
    assert float(failures.numpy()) == 3.0
    assert [items for items, _ in devices] == [(0, 2), (1,)]
    assert devices[0][1].endswith("CPU:0") and devices[1][1].endswith("CPU:1")


def test_splits_work_only_for_mirrored_strategies(mirrored):
    assert sharding.splits_work(mirrored, "auto")
    assert sharding.splits_work(mirrored, True)
    assert not sharding.splits_work(mirrored, False)
    assert not sharding.splits_work(tf.distribute.get_strategy(), "auto")
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert not sharding.splits_work(one, True)
