"""Shampoo matches an independent NumPy reference over many steps and refreshes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import (
    FLOAT32_UNIT_ROUNDOFF,
    assert_root_matches_reference,
    factor_views_by_block,
)
from tests.optimizers.shampoo_reference import NumpyShampoo

# A matrix, a 4-D conv kernel whose small dims merge ([3,3,2,4] -> [9, 8]),
# a 1-D bias, a parameter split into blocks (40 -> 16+16+8) and one whose dims
# all merge into a vector ([2,3,2] -> [12]).
SHAPES = [(6, 10), (3, 3, 2, 4), (5,), (40, 6), (2, 3, 2)]
STEPS = 24


def _gradients(rng, shapes, steps):
    return [
        [rng.normal(size=s) * (1.0 + 0.5 * np.sin(t + i)) for i, s in enumerate(shapes)]
        for t in range(steps)
    ]


def _run_both(dtype, shapes, steps, root_method="eigh", **kwargs):
    """(optimizer's weights, reference weights, optimizer, reference) after
    `steps` steps on the same gradients; the reference always uses a float64
    eigendecomposition, whatever `root_method` the optimizer uses."""
    rng = np.random.default_rng(42)
    init = [rng.normal(size=s) for s in shapes]
    grads = _gradients(rng, shapes, steps)
    variables = [keras.Variable(w.astype(dtype), dtype=dtype) for w in init]
    opt = tfso.Shampoo(root_method=root_method, **kwargs)
    opt.build(variables)

    @tf.function
    def apply(gs):
        opt.apply(gs, variables)

    ref = NumpyShampoo(shapes, **kwargs)
    ref_weights = [w.copy() for w in init]
    for t in range(steps):
        apply([tf.constant(g.astype(dtype)) for g in grads[t]])
        ref_weights = ref.step(ref_weights, grads[t])
    return [v.numpy() for v in variables], ref_weights, opt, ref


# Statistics every step: every gradient reaches the roots the check compares.
BASE = dict(
    learning_rate=0.01,
    block_size=16,
    precondition_frequency=4,
    start_preconditioning_step=4,
    epsilon=1e-6,
    statistics_frequency=1,
)


@pytest.mark.parametrize(
    "options",
    [
        dict(grafting="adam"),
        dict(grafting="sgd", nesterov=True, beta2=0.95, statistics_frequency=3),
        dict(grafting="adam", shampoo_beta=None),
        dict(grafting="adagrad", beta1=0.0),
        dict(grafting="rmsprop", exponent_override=2, weight_decay=0.1),
        dict(grafting=None, beta2=1.0, shampoo_beta=1.0),
        dict(precondition_1d=True, exponent_override=None, packed_statistics=True),
        dict(root_refresh="in_step"),
        dict(refresh_delay=1),
        dict(refresh_delay=3, statistics_frequency=2),
    ],
    ids=[
        "adam",
        "sgd-nesterov-stats3",
        "shampoo-beta-none",
        "adagrad-nomomentum",
        "rmsprop-exp2-wd",
        "none-sum",
        "vectors-p2k-packed",
        "in-step",
        "delay1",
        "delay3-stats2",
    ],
)
def test_matches_reference_float64(options):
    got, want, opt, _ = _run_both("float64", SHAPES, STEPS, **dict(BASE, **options))
    assert int(opt.root_failures.numpy()) == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9)


def test_matches_reference_float32():
    # Roots are computed in float32 here; with rank-deficient statistics and a
    # 1e-6 ridge, Overton's bound is ~1e6/2 · 2^-24 ≈ 3e-2 relative per root.
    # Bugs give O(1) differences.
    got, want, opt, _ = _run_both("float32", SHAPES, STEPS, **BASE)
    assert int(opt.root_failures.numpy()) == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=3e-3, atol=1e-3)


def test_matches_reference_float32_tiny_epsilon_full_rank():
    # With epsilon=1e-12, below float32 resolution, the null space of a
    # rank-deficient statistic is rounding noise (Overton), so this
    # check uses shapes whose statistics have full rank at the first refresh.
    shapes = [(6, 10), (3, 3, 2, 4), (3,), (40, 6)]
    got, want, opt, _ = _run_both("float32", shapes, STEPS, **dict(BASE, epsilon=1e-12))
    assert int(opt.root_failures.numpy()) == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3)


def test_matches_reference_schedule_and_max_preconditioned_dim():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, 5, 0.7)
    options = dict(BASE, learning_rate=schedule, max_preconditioned_dim=12)
    got, want, _, _ = _run_both("float64", SHAPES, 12, **options)
    # Keras evaluates the schedule in float32: compare at float32 precision.
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_reference_is_not_trivially_adam():
    """The preconditioned run must differ from the grafting-only run (sanity)."""
    got, _, _, _ = _run_both("float64", SHAPES, 8, **BASE)
    unpreconditioned, _, _, _ = _run_both(
        "float64", SHAPES, 8, **dict(BASE, start_preconditioning_step=100)
    )
    assert max(np.abs(a - b).max() for a, b in zip(got, unpreconditioned)) > 1e-3


def _factor_variables(opt, kind, ref):
    """Views of the optimizer's `kind` ("statistics" / "preconditioner")
    matrices in the reference's order: parameter by parameter, block by
    block (C order), axis by axis; blocks matched by where they start."""
    views = factor_views_by_block(opt, kind)
    return [
        views[i, tuple(sl.start for sl in param["blocks"][b]), a]
        for i, param in enumerate(ref.params)
        for (b, a) in param["stats"]
    ]


def test_matches_reference_coupled_newton_float32():
    """Coupled-Newton Shampoo against the float64 eigh reference, checked at
    each refresh, with every tolerance derived from float32 rounding.

    The weights never feed back into the gradients here (they are given), so
    the runs differ only by (1) the roots, (2) the float32 rounding of the
    statistics and (3) the float32 rounding of the update arithmetic. At each
    refresh each root is checked against the float64 root of the optimizer's
    own statistics with the coupled Newton error bound
    (`inverse_root_tolerance`: float32 backward error propagated through
    λ^(-1/p), n·1e-6/p for stopping at max|M − I| ≤ 1e-6, and the rounding
    of the iterations' matmuls), and the statistics against the reference's;
    the reference then continues from the optimizer's roots, so the weights
    differ only by (3).
    """
    u = FLOAT32_UNIT_ROUNDOFF
    # A blocked matrix (40 -> 16+16+8) and a vector: four (size, p) groups,
    # each an XLA compilation of the iteration. Three refreshes.
    shapes, steps = [(40, 6), (8,)], 12
    # A ridge of 1e-4 keeps the rounding term of the root bound below 1 for
    # rank-deficient statistics (κ ≤ 1e4); at BASE's 1e-6 it would not bound.
    options = dict(
        BASE, epsilon=1e-4, root_method="coupled_newton", root_refresh="in_step"
    )
    rng = np.random.default_rng(42)
    init = [rng.normal(size=s) for s in shapes]
    grads = _gradients(rng, shapes, steps)
    variables = [keras.Variable(w.astype("float32")) for w in init]
    opt = tfso.Shampoo(**options)
    opt.build(variables)
    ref_kwargs = {k: v for k, v in options.items() if k != "root_method"}
    flat = {}  # (param index, (block, axis)) -> position in the factor lists
    ref = NumpyShampoo(
        shapes,
        root_fn=lambda i, key, s, p, eps: (
            preconditioners[flat[i, key]].numpy().astype(np.float64)
        ),
        **ref_kwargs,
    )
    for i, param in enumerate(ref.params):
        for key in param["stats"]:
            flat[i, key] = len(flat)
    statistics = _factor_variables(opt, "statistics", ref)
    preconditioners = _factor_variables(opt, "preconditioner", ref)
    assert len(flat) == len(preconditioners) == len(statistics)
    exponents = {
        flat[i, key]: param["p"] for (i, key) in flat for param in [ref.params[i]]
    }

    @tf.function
    def apply(gs):
        opt.apply(gs, variables)

    weights = [w.copy() for w in init]
    history = [weights]
    refreshes = 0
    for t in range(1, steps + 1):
        apply([tf.constant(g.astype("float32")) for g in grads[t - 1]])
        due = t >= BASE["start_preconditioning_step"] and (
            (t - BASE["start_preconditioning_step"]) % BASE["precondition_frequency"]
            == 0
        )
        if due:
            refreshes += 1
            for j, preconditioner in enumerate(preconditioners):
                assert_root_matches_reference(
                    preconditioner.numpy(),
                    statistics[j].numpy(),
                    exponents[j],
                    options["epsilon"],
                    "coupled_newton",
                    f"step {t} factor {j}",
                )
        weights = ref.step(weights, grads[t - 1])
        history.append(weights)
        if due:
            # Statistics, float32 vs float64: the gram of an n×m block rounds
            # by m·u of trace(GGᵀ), plus 2u for the gradient rounded to
            # float32; each of the t EMA steps rounds a product and a sum
            # (2u); float32's β2 is off by up to u·β2, which is u·β2/(1 − β2)
            # relative in (1 − β2). All relative to trace(S) ≥ ‖S‖_F (S is a
            # positive combination of grams).
            beta2 = ref.b2
            for (i, (b, a)), j in flat.items():
                want = ref.params[i]["stats"][b, a]
                block = ref.params[i]["blocks"][b]
                m = int(np.prod([sl.stop - sl.start for sl in block])) // len(want)
                terms = m + 2 + 2 * t + beta2 / (1 - beta2)
                got = statistics[j].numpy().astype(np.float64)
                assert np.linalg.norm(got - want) <= terms * u * np.trace(want), (t, j)
    assert refreshes == 3 and int(opt.root_failures.numpy()) == 0

    # (3) The update in float32 from the same roots. Per step, relative to
    # the step's size: P·G·Q rounds by 2n·u·‖P‖‖G‖‖Q‖ ≤ 2n·u·ε^(-1/2)·‖PGQ‖
    # (κ(P_i) ≤ ε^(-1/p) and the k factors of an order-k block give
    # ε^(-k/(2k))); the two norms of the grafting rescale by N·u each for a
    # block of N elements; float32's β2 changes (1 − β2) and the bias
    # corrections by u·β2/(1 − β2) relative (twice); the accumulators'
    # t steps add t·u each; 16·u covers the remaining handful of roundings.
    # Each step also rounds the float32 weights: u·‖w‖.
    n = options["block_size"]
    big = max(int(np.prod(np.minimum(s, n))) for s in shapes)
    beta2 = ref.b2
    gamma = (
        2 * n * options["epsilon"] ** -0.5 + 2 * big + 2 * steps + 16
    ) * u + 2 * u * beta2 / (1 - beta2)
    got = [v.numpy().astype(np.float64) for v in variables]
    for k, (g, w) in enumerate(zip(got, weights)):
        bound = sum(
            gamma * np.linalg.norm(history[t][k] - history[t - 1][k])
            + u * np.linalg.norm(history[t][k])
            for t in range(1, steps + 1)
        )
        assert np.linalg.norm(g - w) <= bound, (k, np.linalg.norm(g - w), bound)
