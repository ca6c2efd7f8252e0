"""Shampoo's and SOAP's memory options hold the numbers they claim to hold.

`packed_statistics` stores each statistic's upper triangle: every entry is
updated elementwise from the same gram as the unpacked run's, so the packed
values equal the unpacked run's upper triangles bit for bit (same ops). The
weights then agree with the NumPy reference (test_shampoo_reference, test_soap).
`preconditioner_dtype="bfloat16"` stores the float32 root rounded once.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tf_secondorder.linalg import pack_symmetric, packed_size, unpack_symmetric

SHAPES = [(6, 10), (3, 3, 2, 4), (40, 6)]


def _apply(make, steps, **options):
    rng = np.random.default_rng(7)
    variables = [keras.Variable(rng.normal(size=s).astype("float32")) for s in SHAPES]
    optimizer = make(
        learning_rate=0.01, block_size=16, precondition_frequency=3, **options
    )
    optimizer.build(variables)
    apply = tf.function(lambda gs: optimizer.apply(gs, variables))
    for _ in range(steps):
        apply([tf.constant(rng.normal(size=s).astype("float32")) for s in SHAPES])
    return optimizer


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_pack_and_unpack_match_numpy(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(3, n, n)).astype("float32")
    symmetric = a + np.swapaxes(a, 1, 2)
    rows, cols = np.triu_indices(n)
    packed = pack_symmetric(tf.constant(symmetric)).numpy()
    assert packed.shape == (3, packed_size(n)) and packed_size(n) == len(rows)
    np.testing.assert_array_equal(packed, symmetric[:, rows, cols])
    np.testing.assert_array_equal(unpack_symmetric(packed, n).numpy(), symmetric)


@pytest.mark.parametrize("make", [tfso.Shampoo, tfso.SOAP], ids=["shampoo", "soap"])
def test_packed_statistics_are_the_upper_triangles_bit_for_bit(make):
    # Gradients are fixed by the seed, not by the weights, so both runs see
    # the same gradients whatever their roots; 7 steps cover 2 refreshes.
    full = _apply(make, 7, statistics_frequency=1)
    packed = _apply(make, 7, statistics_frequency=1, packed_statistics=True)
    assert len(full._statistics) == len(packed._statistics) > 0
    for f, p in zip(full._statistics, packed._statistics):
        matrices = f.numpy()
        rows, n = matrices.shape[:2]
        assert tuple(p.shape) == (rows, n * (n + 1) // 2)
        np.testing.assert_array_equal(
            p.numpy(), matrices[:, np.triu_indices(n)[0], np.triu_indices(n)[1]]
        )
    assert int(packed.root_failures.numpy()) == 0


def test_bfloat16_roots_are_the_float32_roots_rounded_once():
    # Up to and including the first refresh (step 3) both runs execute the
    # same ops (roots are the identity before it), so the stored bfloat16
    # root is exactly the float32 run's root cast once.
    full = _apply(tfso.Shampoo, 3, root_refresh="in_step")
    low = _apply(
        tfso.Shampoo, 3, preconditioner_dtype="bfloat16", root_refresh="in_step"
    )
    assert int(full.refreshes.numpy()) == 1
    for f, b in zip(full._preconditioners, low._preconditioners):
        assert b.dtype == "bfloat16" and f.dtype == "float32"
        assert not np.array_equal(f.numpy()[0], np.eye(f.shape[-1]))
        np.testing.assert_array_equal(b.numpy(), tf.cast(f.value, tf.bfloat16).numpy())


def test_memory_options_shrink_the_state_as_stated():
    def factor_bytes(optimizer):
        return sum(
            int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
            for v in optimizer.variables
            if "_statistics_" in v.path or "_preconditioner_" in v.path
        )

    full = _apply(tfso.Shampoo, 0, root_refresh="in_step")
    low = _apply(
        tfso.Shampoo,
        0,
        packed_statistics=True,
        preconditioner_dtype="bfloat16",
        root_refresh="in_step",
    )
    sizes = [f.size for f in full._layout.factors]
    assert factor_bytes(full) == sum(2 * 4 * n * n for n in sizes)
    assert factor_bytes(low) == sum(4 * n * (n + 1) // 2 + 2 * n * n for n in sizes)


def test_pipelined_refresh_adds_one_snapshot_of_the_stored_statistics():
    def snapshot_bytes(optimizer):
        return sum(
            int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
            for v in optimizer.variables
            if "_snapshot_" in v.path
        )

    for options in ({}, dict(packed_statistics=True, statistics_dtype="bfloat16")):
        pipelined = _apply(tfso.Shampoo, 0, root_refresh="pipelined", **options)
        sizes = [f.size for f in pipelined._layout.factors]
        per_entry = 2 if options else 4
        stored = (lambda n: n * (n + 1) // 2) if options else (lambda n: n * n)
        assert snapshot_bytes(pipelined) == sum(per_entry * stored(n) for n in sizes)
        assert snapshot_bytes(_apply(tfso.Shampoo, 0, root_refresh="in_step")) == 0


@pytest.mark.parametrize(
    "name, value",
    [("packed_statistics", "yes"), ("preconditioner_dtype", "float16")],
)
def test_bad_memory_option_is_named(name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        tfso.Shampoo(**{name: value})
