"""Compressors against NumPy references: values, bounds, unbiasedness, bytes."""

import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.distribute import compression_reference as ref
from tf_secondorder.distribute import packing
from tf_secondorder.distribute.channel import Channel

C = tfso.compression
SEED = tf.constant([3, 7], tf.int64)


def _x(shape=(6, 11), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _uniform(shape, seed=SEED):
    return tf.random.stateless_uniform(shape, seed=seed).numpy().astype(np.float64)


def roundtrip(compressor, x, seed=SEED):
    x = tf.constant(x)
    return compressor.decompress(compressor.compress(x, seed), x.shape, seed).numpy()


@pytest.mark.parametrize("bits", packing.FIELD_WIDTHS)
def test_pack_unpack_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=77)
    words = packing.pack_bits(tf.constant(codes), bits)
    assert words.dtype == tf.int32 and words.shape == (packing.words_for(77, bits),)
    np.testing.assert_array_equal(packing.unpack_bits(words, bits, 77).numpy(), codes)


@pytest.mark.parametrize(
    "compressor, reference",
    [
        (C.Sign(), ref.sign),
        (C.ScaledSign(), ref.scaled_sign),
        (C.Float16(), ref.fp16),
        (C.BFloat16(), ref.bf16),
        (C.TopK(ratio=0.1), lambda x: ref.topk(x, 0.1)),
    ],
    ids=["sign", "scaled_sign", "fp16", "bf16", "topk"],
)
def test_deterministic_compressors_match_numpy(compressor, reference):
    x = _x()
    x[0, 0] = 0.0  # sign(0) = +1
    x[1, 1] = 1e6  # beyond float16's range: saturates
    np.testing.assert_allclose(roundtrip(compressor, x), reference(x), rtol=1e-6)


@pytest.mark.parametrize("bits, bucket_size", [(8, 512), (4, 16), (2, None), (16, 7)])
def test_qsgd_matches_numpy_for_the_same_draws(bits, bucket_size):
    x = _x((5, 13))
    compressor = C.QSGD(bits=bits, bucket_size=bucket_size)
    size = min(bucket_size or x.size, x.size)
    count = -(-x.size // size)
    u = _uniform([count, size])
    expected = ref.qsgd(x, u, bits, bucket_size)
    np.testing.assert_allclose(roundtrip(compressor, x), expected, rtol=1e-5, atol=1e-6)
    # Each value lies within one level of x: |q − x| ≤ ‖bucket‖/s.
    s = 2 ** (bits - 1) - 1
    bound = np.linalg.norm(x) / s if bucket_size is None else None
    if bound is not None:
        assert np.max(np.abs(roundtrip(compressor, x) - x)) <= bound * (1 + 1e-5)


def test_terngrad_and_natural_match_numpy_for_the_same_draws():
    x = _x((9, 7))
    u = _uniform([x.size])
    np.testing.assert_allclose(
        roundtrip(C.TernGrad(), x), ref.terngrad(x, u), rtol=1e-6
    )
    np.testing.assert_array_equal(roundtrip(C.Natural(), x), ref.natural(x, u))
    for levels in (3, 8):
        np.testing.assert_allclose(
            roundtrip(C.Natural(levels=levels), x),
            ref.natural_dithering(x, u, levels),
            rtol=1e-5,
            atol=1e-7,
        )


def test_natural_values_are_the_neighbouring_powers_of_two():
    x = _x((400,)) * 10.0 ** np.random.default_rng(1).integers(-30, 30, 400)
    x[:3] = [0.0, 1e-40, -3e-39]  # zero and subnormals
    y = roundtrip(C.Natural(), x.astype(np.float32))
    assert np.all(np.sign(y[3:]) == np.sign(x[3:]))
    normal = np.abs(x) > 2.0**-126
    lower = 2.0 ** np.floor(np.log2(np.abs(x[normal])))
    assert np.all((np.abs(y[normal]) == lower) | (np.abs(y[normal]) == 2 * lower))
    assert y[0] == 0 and np.all(np.isin(np.abs(y[1:3]), [0.0, 2.0**-126]))


def _draws(compressor, x, samples=4000):
    x = tf.constant(x)

    @tf.function
    def many(x):
        seeds = tf.stack(
            [
                tf.range(samples, dtype=tf.int64),
                tf.fill([samples], tf.constant(5, tf.int64)),
            ],
            1,
        )
        return tf.map_fn(
            lambda s: compressor.decompress(compressor.compress(x, s), x.shape, s),
            seeds,
            fn_output_signature=tf.float32,
        )

    return many(x).numpy().astype(np.float64)


@pytest.mark.parametrize(
    "compressor",
    [
        C.QSGD(bits=4, bucket_size=8),
        C.TernGrad(),
        C.Natural(),
        C.Natural(levels=4),
        C.RandomK(ratio=0.25),
    ],
    ids=["qsgd", "terngrad", "natural", "natural_dithering", "randomk"],
)
def test_unbiased_by_monte_carlo(compressor):
    assert compressor.unbiased
    x = _x((24,), seed=2)
    draws = _draws(compressor, x)
    standard_error = draws.std(axis=0) / np.sqrt(len(draws))
    # 5 standard errors per element: a false alarm has probability < 1e-5.
    assert np.all(np.abs(draws.mean(axis=0) - x) <= 5 * standard_error + 1e-7)


def test_biased_compressors_are_flagged_and_visibly_biased():
    for compressor in (
        C.Sign(),
        C.ScaledSign(),
        C.TopK(0.25),
        C.PowerSGD(),
        C.TernGrad(clip=2.5),
    ):
        assert not compressor.unbiased
    x = _x((24,), seed=2)
    assert np.abs(roundtrip(C.Sign(), x) - x).max() > 0.1


def test_natural_second_moment_is_at_most_nine_eighths():
    x = _x((32,), seed=3)
    draws = _draws(C.Natural(), x)
    ratio = (draws**2).mean(axis=0) / x.astype(np.float64) ** 2
    # Analytic: (1 + 3f)/(1 + f)² ≤ 9/8 with equality at f = 1/3 ... sampled mean near it.
    mantissa, _ = np.frexp(np.abs(x.astype(np.float64)))
    f = 2 * mantissa - 1
    analytic = (1 + 3 * f) / (1 + f) ** 2
    assert np.all(analytic <= 9 / 8 + 1e-12)
    np.testing.assert_allclose(ratio, analytic, rtol=0.05)


def test_randomk_picks_k_shared_coordinates_scaled_by_d_over_k():
    x = _x((10, 10))
    compressor = C.RandomK(ratio=0.05)
    y1, y2 = roundtrip(compressor, x), roundtrip(compressor, x)
    kept = y1 != 0
    assert kept.sum() == 5
    np.testing.assert_allclose(y1[kept], x[kept] * 20, rtol=1e-6)
    np.testing.assert_array_equal(y1, y2)  # same seed, same coordinates
    other = roundtrip(compressor, x, tf.constant([3, 8], tf.int64))
    assert not np.array_equal(other != 0, kept)


SHAPES = [(7,), (33, 5), (3, 3, 2, 4), (1000,)]
ALL = [
    C.Float16(),
    C.BFloat16(),
    C.Sign(),
    C.ScaledSign(),
    C.QSGD(),
    C.QSGD(bits=2, bucket_size=None),
    C.TernGrad(),
    C.Natural(),
    C.Natural(levels=5),
    C.TopK(0.1),
    C.RandomK(0.1),
]


@pytest.mark.parametrize("compressor", ALL, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_wire_bytes_are_exact_and_dtypes_collective_safe(compressor, shape):
    wire = compressor.compress(tf.constant(_x(shape)), SEED)
    actual = sum(int(np.prod(w.shape)) * w.dtype.size for w in wire)
    assert compressor.wire_bytes(shape) == actual
    assert {w.dtype for w in wire} <= {tf.float16, tf.bfloat16, tf.float32, tf.int32}


def test_sign_is_one_bit_per_element():
    assert C.Sign().wire_bytes((1024, 1024)) * 32 == 4 * 1024 * 1024


def _on_replicas(strategy, compressor, xs, majority_vote=False, states=None):
    """Runs `compressor.reduce` with replica r holding xs[r]; returns (agg, local) per replica."""
    stacked = tf.constant(np.stack(xs))

    @tf.function
    def step():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            r = context.replica_id_in_sync_group
            seed = tf.stack([tf.constant(1, tf.int64), tf.cast(r, tf.int64)])
            state = [[tf.constant(s) for s in states]] if states else [[]]
            agg, local, _ = compressor.reduce(
                Channel(context), [stacked[r]], [seed], state, majority_vote
            )
            return agg[0], local[0]

        return strategy.run(replica_fn)

    agg, local = step()
    unpack = strategy.experimental_local_results
    return [a.numpy() for a in unpack(agg)], [a.numpy() for a in unpack(local)]


def test_reduce_averages_decoded_replicas_and_replicas_agree(mirrored):
    xs = [_x((4, 9), seed=s) for s in (0, 1)]
    for compressor, reference, wire_sum in [
        (C.Sign(), ref.sign, np.add),
        (C.TopK(0.2), lambda x: ref.topk(x, 0.2), np.add),
        # float16 wires are summed in float16 by the all-reduce.
        (C.Float16(), ref.fp16, lambda a, b: ref.fp16(a + b)),
    ]:
        agg, local = _on_replicas(mirrored, compressor, xs)
        np.testing.assert_array_equal(agg[0], agg[1])
        expected = wire_sum(reference(xs[0]), reference(xs[1])) / 2
        np.testing.assert_allclose(agg[0], expected, rtol=1e-6, atol=1e-7)
        for r in range(2):
            np.testing.assert_allclose(local[r], reference(xs[r]), rtol=1e-6)


def test_majority_vote_is_sign_of_sum_of_signs(mirrored):
    xs = [_x((50,), seed=s) for s in (4, 5)]
    agg, _ = _on_replicas(mirrored, C.Sign(), xs, majority_vote=True)
    votes = ref.sign(xs[0]) + ref.sign(xs[1])
    np.testing.assert_array_equal(agg[0], np.where(votes >= 0, 1.0, -1.0))
    assert set(np.unique(votes)) == {-2.0, 0.0, 2.0}  # ties (→ +1) were exercised


def test_powersgd_matches_numpy_and_is_exact_for_low_rank(mirrored):
    rng = np.random.default_rng(6)
    compressor = C.PowerSGD(rank=2)
    q = compressor.initial_state((12, 8), 0)[0]
    xs = [rng.normal(size=(12, 8)).astype(np.float32) for _ in range(2)]
    agg, local = _on_replicas(mirrored, compressor, xs, states=[q])
    np.testing.assert_allclose(agg[0], ref.powersgd_mean(xs, q), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(agg[0], agg[1])
    a, b = rng.normal(size=(12, 2)), rng.normal(size=(2, 8))
    low_rank = [(a @ b).astype(np.float32), (2 * a @ b).astype(np.float32)]
    agg, _ = _on_replicas(mirrored, compressor, low_rank, states=[q])
    np.testing.assert_allclose(agg[0], 1.5 * a @ b, rtol=1e-4, atol=1e-4)


def test_powersgd_leaves_vectors_and_small_matrices_uncompressed():
    compressor = C.PowerSGD(rank=4)
    assert compressor.state_shapes((100,)) == []
    assert compressor.state_shapes((4, 4)) == []
    assert compressor.wire_bytes((100,)) == 400
    assert compressor.wire_bytes((1000, 1000)) == 4 * 4 * 2000


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: C.TopK(ratio=0.0), "ratio"),
        (lambda: C.RandomK(ratio=1.5), "ratio"),
        (lambda: C.PowerSGD(rank=0), "rank"),
        (lambda: C.QSGD(bits=3), "bits"),
        (lambda: C.Natural(levels=0), "levels"),
        (lambda: C.TernGrad(clip=-1), "clip"),
        (lambda: C.get("zip"), "compression"),
    ],
)
def test_bad_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make()


def test_names_resolve_to_compressors():
    assert C.names() == sorted(
        [
            "fp16",
            "bf16",
            "sign",
            "scaled_sign",
            "qsgd",
            "terngrad",
            "natural",
            "topk",
            "randomk",
            "powersgd",
        ]
    )
    for name in C.names():
        assert isinstance(C.get(name), C.Compressor)
