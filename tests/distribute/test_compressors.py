"""Compressors against NumPy references: values, bounds, unbiasedness, bytes."""

import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.distribute import compression_reference as ref
from tf_secondorder.compression import packing
from tf_secondorder.distribute import aggregators, voting
from tf_secondorder.distribute.channel import Channel

C = tfso.compression
SEED = tf.constant([3, 7], tf.int64)


def _x(shape=(6, 11), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _uniform(shape, seed=SEED):
    return tf.random.stateless_uniform(shape, seed=seed).numpy().astype(np.float64)


def roundtrip(compressor, x, seed=SEED):
    x = tf.constant(x)
    return compressor.decode(compressor.encode(x, seed), x.shape, seed).numpy()


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
            lambda s: compressor.decode(compressor.encode(x, s), x.shape, s),
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
        C.Int8(bucket_size=8),
        C.Int4(),
    ],
    ids=["qsgd", "terngrad", "natural", "natural_dithering", "randomk", "int8", "int4"],
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
    """Horváth et al.: E[q²] ≤ 9/8·x². For x = 2^e(1 + f) the exact value is
    (1 + 3f)/(1 + f)²·x², largest (9/8) at f = 1/3; the draws come from the
    implementation, so a rounding probability other than f fails here."""
    fractions = np.array([0.0, 0.1, 1 / 3, 0.5, 0.9])
    x = np.concatenate([(1 + fractions) * 2.0**e for e in (-3, 0, 5)]).astype(
        np.float32
    )
    draws = _draws(C.Natural(), x, samples=8000)
    second = (draws**2).mean(axis=0)
    ratio = second / x.astype(np.float64) ** 2
    # Standard error of the sampled ratio; 5 of them bound a false alarm
    # below 1e-5 per element.
    error = (draws**2).std(axis=0) / np.sqrt(len(draws)) / x.astype(np.float64) ** 2
    assert np.all(ratio <= 9 / 8 + 5 * error + 1e-12)
    f = np.tile(fractions, 3)
    np.testing.assert_allclose(ratio, (1 + 3 * f) / (1 + f) ** 2, atol=5 * error.max())
    worst = np.isclose(f, 1 / 3)
    assert np.all(np.abs(ratio[worst] - 9 / 8) <= 5 * error[worst] + 1e-12)


def test_integer_levels_lie_in_the_bucket_range():
    """|q − x| < s/L for s = the bucket's largest magnitude, L = 2^(bits−1) − 1:
    stochastic rounding moves each value to one of its two neighbouring levels."""
    x = _x((3, 40)) * np.linspace(0.1, 10, 120).reshape(3, 40).astype(np.float32)
    for codec, levels in ((C.Int8(bucket_size=16), 127), (C.Int4(bucket_size=16), 7)):
        y = roundtrip(codec, x).reshape(-1)
        buckets = np.pad(np.abs(x).reshape(-1), (0, 8)).reshape(-1, 16)
        scale = np.repeat(buckets.max(axis=1), 16)[: x.size]
        assert np.all(np.abs(y - x.reshape(-1)) <= scale / levels * (1 + 1e-6))
        steps = np.round(y / scale * levels, 3)
        np.testing.assert_array_equal(steps, np.round(steps))


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
    C.Int8(),
    C.Int4(bucket_size=5),
]


@pytest.mark.parametrize("compressor", ALL, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_wire_bytes_are_exact_and_dtypes_collective_safe(compressor, shape):
    wire = compressor.encode(tf.constant(_x(shape)), SEED)
    actual = sum(int(np.prod(w.shape)) * w.dtype.size for w in wire)
    assert compressor.wire_bytes(shape) == actual
    assert {w.dtype for w in wire} <= {tf.float16, tf.bfloat16, tf.float32, tf.int32}


def test_sign_is_one_bit_per_element():
    assert C.Sign().wire_bytes((1024, 1024)) * 32 == 4 * 1024 * 1024


def _on_replicas(strategy, aggregator, xs, finite=(True, True)):
    """`aggregator.reduce` with replica r holding xs[r]; returns (aggregate,
    sent, all_finite) per replica."""
    stacked = tf.constant(np.stack(xs))
    flags = tf.constant(finite)

    @tf.function
    def step():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            r = context.replica_id_in_sync_group
            channel = Channel(context, flags[r])
            agg, sent = aggregator.reduce(
                channel, [stacked[r]], [1], tf.constant(0, tf.int64)
            )
            with tf.control_dependencies(channel.updates):
                return tf.identity(agg[0]), tf.identity(sent[0]), channel.all_finite

        return strategy.run(replica_fn)

    outputs = step()
    unpack = strategy.experimental_local_results
    return [[a.numpy() for a in unpack(o)] for o in outputs]


def test_reduce_averages_decoded_replicas_and_replicas_agree(mirrored):
    xs = [_x((4, 9), seed=s) for s in (0, 1)]
    for aggregator, reference, wire_sum in [
        (aggregators.GatherMean(C.Sign()), ref.sign, np.add),
        (aggregators.GatherMean(C.TopK(0.2)), lambda x: ref.topk(x, 0.2), np.add),
        # float16 wires are summed in float16 by the all-reduce.
        (
            aggregators.AllReduceMean(C.Float16()),
            ref.fp16,
            lambda a, b: ref.fp16(a + b),
        ),
        # bfloat16 travels through a gather as int32 words, bit for bit.
        (aggregators.GatherMean(C.BFloat16()), ref.bf16, np.add),
    ]:
        agg, sent, finite = _on_replicas(mirrored, aggregator, xs)
        np.testing.assert_array_equal(agg[0], agg[1])
        expected = wire_sum(reference(xs[0]), reference(xs[1])) / 2
        np.testing.assert_allclose(agg[0], expected, rtol=1e-6, atol=1e-7)
        assert finite == [True, True]
        for r in range(2):
            np.testing.assert_allclose(sent[r], reference(xs[r]), rtol=1e-6)


@pytest.mark.parametrize(
    "aggregator",
    [
        aggregators.GatherMean(C.Sign()),
        aggregators.AllReduceMean(C.Float16()),
    ],
    ids=["gather", "all_reduce"],
)
def test_one_replica_not_finite_is_known_to_every_replica(mirrored, aggregator):
    """The first collective carries each replica's "not finite" flag."""
    xs = [_x((4, 9), seed=s) for s in (0, 1)]
    for flags, expected in [((True, False), False), ((False, True), False)]:
        _, _, finite = _on_replicas(mirrored, aggregator, xs, finite=flags)
        assert finite == [expected, expected]


def test_majority_vote_is_sign_of_sum_of_signs(mirrored):
    xs = [_x((50,), seed=s) for s in (4, 5)]
    agg, _, _ = _on_replicas(mirrored, voting.MajorityVote(C.Sign()), xs)
    votes = ref.sign(xs[0]) + ref.sign(xs[1])
    np.testing.assert_array_equal(agg[0], np.where(votes >= 0, 1.0, -1.0))
    assert set(np.unique(votes)) == {-2.0, 0.0, 2.0}  # ties (→ +1) were exercised


class _Factor:
    """The state a PowerSGD aggregator gets from an optimizer, for one tensor."""

    def __init__(self, strategy, value):
        with strategy.scope():
            self.variable = tf.Variable(
                value,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def shared(self, variable, suffix, shape, initializer):
        return self.variable


def test_powersgd_matches_numpy_and_is_exact_for_low_rank(mirrored):
    rng = np.random.default_rng(6)
    scheme = C.PowerSGD(rank=2)
    q = scheme.initial_factor((12, 8), 1)
    xs = [rng.normal(size=(12, 8)).astype(np.float32) for _ in range(2)]
    aggregator = aggregators.PowerSGDMean(scheme)
    dummy = tf.zeros((12, 8))
    aggregator.build(_Factor(mirrored, q), [dummy, dummy])
    agg, _, _ = _on_replicas(mirrored, aggregator, xs)
    np.testing.assert_allclose(agg[0], ref.powersgd_mean(xs, q), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(agg[0], agg[1])
    # The mean Q is kept as the next step's warm start.
    assert not np.allclose(aggregator.factors[1].numpy(), q)
    a, b = rng.normal(size=(12, 2)), rng.normal(size=(2, 8))
    low_rank = [(a @ b).astype(np.float32), (2 * a @ b).astype(np.float32)]
    agg, _, _ = _on_replicas(mirrored, aggregator, low_rank)
    np.testing.assert_allclose(agg[0], 1.5 * a @ b, rtol=1e-4, atol=1e-4)


def test_powersgd_leaves_vectors_and_small_matrices_uncompressed():
    compressor = C.PowerSGD(rank=4)
    assert (
        compressor.plan((100,)) is None and compressor.initial_factor((100,), 0) is None
    )
    assert compressor.plan((4, 4)) is None
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
            "int8",
            "int4",
        ]
    )
    for name in C.names():
        scheme = C.get(name)
        assert isinstance(scheme, C.PowerSGD if name == "powersgd" else C.Compressor)
        assert type(scheme).name == name
