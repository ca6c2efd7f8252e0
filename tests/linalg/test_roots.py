"""Inverse p-th roots: coupled Newton vs eigh vs a float64 NumPy reference."""

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import assert_root_matches_reference
from tf_secondorder.linalg import inverse_pth_root, resolve_root_method


def spd(rng, n, kappa, rank=None):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigenvalues = np.logspace(0, -np.log10(kappa), n)
    if rank is not None:
        eigenvalues[rank:] = 0.0
    return (q * eigenvalues) @ q.T


def reference(a, p, eps):
    lam, q = np.linalg.eigh(np.asarray(a, np.float64))
    if lam.max() <= 0:
        return np.eye(len(a))
    return (q * (np.maximum(lam, 0) + eps * lam.max()) ** (-1.0 / p)) @ q.T


def rel_error(x, ref):
    return np.linalg.norm(x - ref, 2) / np.linalg.norm(ref, 2)


@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
@pytest.mark.parametrize("kappa", [10.0, 1e3, 1e6, 1e10])
@pytest.mark.parametrize("p", [2, 4])
def test_float64_matches_reference(rng, method, kappa, p):
    a = spd(rng, 48, kappa)
    root, ok, _ = inverse_pth_root(tf.constant(a), p, 1e-12, method)
    assert bool(ok)
    # Overton: about log2(kappa/p) bits are lost of float64's 52.
    assert rel_error(root.numpy(), reference(a, p, 1e-12)) < 1e-14 * kappa + 1e-12


@pytest.mark.parametrize("kappa", [10.0, 1e3, 1e6, 1e10])
def test_float32_methods_against_reference_of_rounded_input(rng, kappa):
    """In float32 the input itself is rounded: compare with its exact root."""
    a32 = spd(rng, 48, kappa).astype(np.float32)
    eigh_root, eigh_ok, _ = inverse_pth_root(tf.constant(a32), 4, 1e-6, "eigh")
    assert bool(eigh_ok)
    assert eigh_root.dtype == tf.float32
    # Overton: a p-th root loses log2(κ/p) of float32's 24 bits; the ridge
    # caps the effective κ at 1/1e-6.
    overton = min(kappa, 1e6) / 4 * 2.0**-24
    assert rel_error(eigh_root.numpy(), reference(a32, 4, 1e-6)) < 2 * overton + 1e-5
    # A float64 eigensolve of the same float32 input is exact.
    exact, _, _ = inverse_pth_root(
        tf.constant(a32), 4, 1e-12, "eigh", compute_dtype="float64"
    )
    assert exact.dtype == tf.float32
    assert rel_error(exact.numpy(), reference(a32, 4, 1e-12)) < 1e-6
    # Coupled Newton floors the relative ridge at 10 ulps of float32.
    newton_root, newton_ok, error = inverse_pth_root(
        tf.constant(a32), 4, 1e-12, "coupled_newton"
    )
    assert bool(newton_ok) and float(error) < 1e-3
    assert rel_error(newton_root.numpy(), reference(a32, 4, 1.2e-6)) < 0.02
    if kappa <= 1e3:
        same_ridge, _, _ = inverse_pth_root(tf.constant(a32), 4, 1.2e-6, "eigh")
        assert rel_error(newton_root.numpy(), same_ridge.numpy()) < 1e-4


@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
def test_rank_deficient(rng, method):
    a = spd(rng, 32, 10.0, rank=5)
    root, ok, _ = inverse_pth_root(tf.constant(a), 4, 1e-8, method)
    assert bool(ok)
    # Coupled Newton's ridge is relative to a power-iteration estimate of λ_max.
    tolerance = 1e-6 if method == "eigh" else 1e-4
    assert rel_error(root.numpy(), reference(a, 4, 1e-8)) < tolerance
    # On the range of A the root is the ordinary one.
    lam, q = np.linalg.eigh(a)
    top = q[:, -1]
    np.testing.assert_allclose(
        top @ root.numpy() @ top, (lam[-1] * (1 + 1e-8)) ** -0.25, rtol=tolerance
    )


@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
def test_zero_matrix_gives_identity(method):
    roots, ok, _ = inverse_pth_root(tf.zeros([3, 5, 5], tf.float32), 4, method=method)
    assert np.all(ok.numpy())
    np.testing.assert_array_equal(roots.numpy(), np.tile(np.eye(5), [3, 1, 1]))


@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
def test_non_finite_input_is_rejected_alone(rng, method):
    good = spd(rng, 6, 10.0).astype(np.float32)
    bad = good.copy()
    bad[1, 2] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    roots, ok, _ = inverse_pth_root(
        tf.constant(np.stack([good, bad, inf])), 2, method=method
    )
    assert ok.numpy().tolist() == [True, False, False]
    assert np.all(np.isfinite(roots.numpy()[0]))


@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
def test_batched_equals_one_by_one(rng, method):
    mats = np.stack([spd(rng, 16, k) for k in (2.0, 50.0, 1e4)])
    batched, _, _ = inverse_pth_root(tf.constant(mats), 4, 1e-10, method)
    for i, m in enumerate(mats):
        single, _, _ = inverse_pth_root(tf.constant(m), 4, 1e-10, method)
        np.testing.assert_allclose(
            batched.numpy()[i], single.numpy(), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("n", [4, 8])
def test_coupled_newton_converges_when_its_max_error_first_grows(n):
    # The statistic of a constant-sign gradient: rank one, spread over every
    # coordinate. Scaled, M = z·A has diagonal ≈ (p+1)/(2n), and after one
    # step its top eigenvalue (along the all-ones vector) falls to ≈ 0.38
    # while the rest stay tiny, so every |M_ii − 1| grows before converging.
    a = np.ones((n, n), np.float32)
    root, ok, _ = inverse_pth_root(tf.constant(a), 4, 1e-4, "coupled_newton")
    assert bool(ok)
    assert_root_matches_reference(root.numpy(), a, 4, 1e-4, "coupled_newton")


def test_coupled_newton_iteration_cap_marks_failure(rng):
    a = spd(rng, 16, 1e8)
    _, ok, error = inverse_pth_root(
        tf.constant(a), 4, 1e-12, "coupled_newton", max_iterations=3
    )
    assert not bool(ok) and float(error) > 0.1


def test_root_method_validation():
    assert resolve_root_method("auto") == "eigh"  # no TPU here
    with pytest.raises(ValueError, match="root_method"):
        resolve_root_method("cholesky")
    with pytest.raises(ValueError, match="integer root"):
        inverse_pth_root(tf.eye(3), 2.5, method="coupled_newton")
