"""Batched inverse p-th roots of symmetric positive semi-definite matrices.

``inverse_pth_root(A, p)`` returns ``(A + r·I)^(-1/p)`` for a stack of
matrices, with the ridge ``r = epsilon · λ_max(A)`` relative to each matrix's
largest eigenvalue, together with a per-matrix acceptance flag and error.
A matrix whose largest eigenvalue is 0 (no statistics yet) has the identity as
its root: there is nothing to precondition with.

Two methods:

* ``"eigh"``: LAPACK/cuSOLVER eigendecomposition,
  ``Q · diag((max(λ, 0) + r)^(-1/p)) · Qᵀ``. Not XLA-compiled on purpose: XLA's
  CPU eigh is an iterative Jacobi method, far slower than the LAPACK kernel
  at the sizes Shampoo uses (docs/benchmarks.md has root timings).
* ``"coupled_newton"``: the stable coupled Newton iteration (Higham,
  *Functions of Matrices*, eq. 7.18; Iannazzo 2006), matmuls only, compiled
  with ``tf.function(jit_compile=True)``. The only choice that runs well on TPU.

Overton's rule of thumb says an inverse p-th root loses about
``log2(κ/p)`` bits, so the iterative method floors the relative ridge at a few
ulps of its dtype: below that, the statistics' smallest eigenvalues are
rounding noise (possibly negative) and the iteration cannot converge.

References:
    - Higham, N. J. (2008). Functions of Matrices, §7.
    - Iannazzo, B. (2006). On the Newton method for the matrix p-th root.
    - Anil et al. (2020). Scalable Second Order Optimization for Deep
      Learning. arXiv:2002.09018.
"""

import tensorflow as tf

ROOT_METHODS = ("auto", "eigh", "coupled_newton")

# A root is rejected if the eigendecomposition residual ||AQ - QΛ||/||A||
# exceeds this (a backward-stable solver gives ~n·ulp; larger means it failed).
EIGH_RESIDUAL_LIMIT = {"float32": 1e-3, "float64": 1e-8}
# A coupled-Newton root is rejected if max|M - I| at exit exceeds this.
NEWTON_ERROR_LIMIT = 0.1


def resolve_root_method(method):
    """Maps ``"auto"`` to ``"coupled_newton"`` on TPU and ``"eigh"`` elsewhere."""
    if method not in ROOT_METHODS:
        raise ValueError(
            f"`root_method` must be one of {list(ROOT_METHODS)}; received {method!r}"
        )
    if method != "auto":
        return method
    if tf.config.list_logical_devices("TPU"):
        return "coupled_newton"
    return "eigh"


def inverse_pth_root(
    matrices,
    p,
    epsilon=1e-12,
    method="eigh",
    max_iterations=100,
    compute_dtype=None,
):
    """Computes ``(A + epsilon·λ_max·I)^(-1/p)`` for a stack of SPD matrices.

    Args:
        matrices: tensor of shape ``[batch, n, n]`` (or ``[n, n]``), symmetric
            positive semi-definite; float32 or float64.
        p: the root, a positive integer (``coupled_newton``) or number
            (``eigh``).
        epsilon: ridge relative to each matrix's largest eigenvalue.
        method: ``"eigh"``, ``"coupled_newton"`` or ``"auto"``.
        max_iterations: iteration cap for ``coupled_newton``.
        compute_dtype: dtype the root is computed in; default the input's.
            A float32 eigensolve adds a backward error of the same order as
            rounding the matrix to float32, so float32 statistics gain little
            from a float64 root at twice the cost.

    Returns:
        ``(roots, ok, error)``: roots in the input dtype; ``ok`` a boolean per
        matrix, false where the input or the root is non-finite or the root is
        inaccurate (the caller must then keep its previous root); ``error`` the
        method's own accuracy measure per matrix.
    """
    method = resolve_root_method(method)
    matrices = tf.convert_to_tensor(matrices)
    if matrices.dtype not in (tf.float32, tf.float64):
        matrices = tf.cast(matrices, tf.float32)
    single = matrices.shape.rank == 2
    if single:
        matrices = matrices[tf.newaxis]
    in_dtype = matrices.dtype
    compute_dtype = tf.as_dtype(compute_dtype or in_dtype)
    if method == "eigh":
        roots, ok, error = _eigh_root(
            tf.cast(matrices, compute_dtype), float(p), float(epsilon)
        )
    else:
        if int(p) != p or p < 1:
            raise ValueError(
                f"`p` must be a positive integer root for coupled_newton; received {p!r}"
            )
        roots, ok, error, _ = _coupled_newton_root(
            tf.cast(matrices, compute_dtype),
            int(p),
            float(epsilon),
            int(max_iterations),
        )
    roots, error = tf.cast(roots, in_dtype), tf.cast(error, in_dtype)
    if single:
        return roots[0], ok[0], error[0]
    return roots, ok, error


def _screen_non_finite(matrices):
    """Replaces non-finite matrices by the identity so kernels never see NaN."""
    finite = tf.reduce_all(tf.math.is_finite(matrices), axis=[-2, -1])
    eye = tf.eye(tf.shape(matrices)[-1], dtype=matrices.dtype)
    safe = tf.where(finite[:, None, None], matrices, eye)
    return safe, finite


def _eigh_root(matrices, p, epsilon):
    # Plain ops, not a nested tf.function: inside a training step that would
    # trace once per matrix size and add a function call to the graph.
    a, finite = _screen_non_finite(matrices)
    a = 0.5 * (a + tf.linalg.matrix_transpose(a))
    eigenvalues, q = tf.linalg.eigh(a)
    lam_max = tf.reduce_max(eigenvalues, axis=-1)
    empty = lam_max <= 0.0
    ridge = epsilon * lam_max
    shifted = tf.maximum(eigenvalues, 0.0) + ridge[:, None]
    shifted = tf.where(empty[:, None], tf.ones_like(shifted), shifted)
    roots = _reconstruct(q, shifted, -1.0 / p)
    residual = tf.norm(
        tf.matmul(a, q) - q * eigenvalues[:, None, :], axis=[-2, -1]
    ) / tf.maximum(tf.norm(a, axis=[-2, -1]), 1e-30)
    ok = (
        finite
        & tf.reduce_all(tf.math.is_finite(roots), axis=[-2, -1])
        & (residual <= EIGH_RESIDUAL_LIMIT[a.dtype.name])
    )
    return roots, ok, residual


def _reconstruct(q, values, power):
    """Q · diag(values^power) · Qᵀ."""
    scaled = q * tf.pow(values, power)[:, None, :]
    return tf.matmul(scaled, q, transpose_b=True)


def _largest_eigenvalue(matrices, iterations=64):
    """Rayleigh quotient after power iteration, batched; exact for rank 1."""
    n = tf.shape(matrices)[-1]
    # A fixed, non-symmetric start vector: deterministic across replicas and
    # unlikely to be orthogonal to the top eigenvector.
    v = 1.0 + tf.cast(tf.range(n), matrices.dtype) / tf.cast(n, matrices.dtype)
    v = tf.tile(v[None, :, None], [tf.shape(matrices)[0], 1, 1])

    def body(i, v):
        w = tf.matmul(matrices, v)
        return i + 1, w / tf.maximum(tf.norm(w, axis=1, keepdims=True), 1e-30)

    _, v = tf.while_loop(lambda i, v: i < iterations, body, (0, v))
    v = v / tf.maximum(tf.norm(v, axis=1, keepdims=True), 1e-30)
    return tf.reduce_sum(v * tf.matmul(matrices, v), axis=[1, 2])


def _matrix_power(m, p):
    result = None
    base = m
    while p:
        if p & 1:
            result = base if result is None else tf.matmul(result, base)
        p >>= 1
        if p:
            base = tf.matmul(base, base)
    return result


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _coupled_newton_root(matrices, p, epsilon, max_iterations):
    dtype = matrices.dtype
    a, finite = _screen_non_finite(matrices)
    a = 0.5 * (a + tf.linalg.matrix_transpose(a))
    n = tf.shape(a)[-1]
    eye = tf.eye(n, batch_shape=[tf.shape(a)[0]], dtype=dtype)
    floor = 10.0 * (1.2e-7 if dtype == tf.float32 else 2.3e-16)
    epsilon = max(epsilon, floor)

    lam_max = tf.maximum(_largest_eigenvalue(a), 0.0)
    empty = lam_max <= 0.0
    lam_max = tf.where(empty, tf.ones_like(lam_max), lam_max)
    a = a + (epsilon * lam_max)[:, None, None] * eye
    # Scale so every eigenvalue of M = z·A lies in (0, (p+1)/2]: inside the
    # iteration's region of convergence (0, p+1) even if λ_max is underestimated
    # by up to 2x.
    z = (1.0 + p) / (2.0 * lam_max * (1.0 + epsilon))
    m = z[:, None, None] * a
    h = tf.pow(z, 1.0 / p)[:, None, None] * eye

    def max_error(m):
        return tf.reduce_max(tf.abs(m - eye), axis=[-2, -1])

    error = max_error(m)
    tolerance = 1e-6 if dtype == tf.float32 else 1e-12
    active = ~empty & (error > tolerance)

    def cond(i, m, h, error, active):
        return (i < max_iterations) & tf.reduce_any(active)

    def body(i, m, h, error, active):
        m_i = (1.0 + 1.0 / p) * eye - m / p
        new_m = tf.matmul(_matrix_power(m_i, p), m)
        new_h = tf.matmul(h, m_i)
        new_error = max_error(new_m)
        # Stop a matrix once its error grows: rounding has taken over. Far
        # from convergence max|M − I| may grow before it falls (the scaled
        # start of a rank-one matrix: 0.69 → 0.95 → ... → 0), so growth only
        # counts once the error is in the quadratic regime (below 1/2).
        grew = (new_error >= 1.2 * error) & (error < 0.5)
        improved = (
            active & ~grew & tf.reduce_all(tf.math.is_finite(new_m), axis=[-2, -1])
        )
        keep = improved[:, None, None]
        m = tf.where(keep, new_m, m)
        h = tf.where(keep, new_h, h)
        error = tf.where(improved, new_error, error)
        active = improved & (new_error > tolerance)
        return i + 1, m, h, error, active

    iterations, m, h, error, _ = tf.while_loop(
        cond, body, (0, m, h, error, active), maximum_iterations=max_iterations
    )
    h = tf.where(empty[:, None, None], eye, h)
    error = tf.where(empty, tf.zeros_like(error), error)
    ok = (
        finite
        & tf.reduce_all(tf.math.is_finite(h), axis=[-2, -1])
        & (error <= NEWTON_ERROR_LIMIT)
    )
    return h, ok, error, iterations
