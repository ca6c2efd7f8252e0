"""Small models and data shared by the tests."""

import os

import keras
import numpy as np
import tensorflow as tf


def run_cli_in_subprocess(args, timeout=300):
    """`python -m tf_secondorder.cli ARGS` in a fresh process (so that it
    sets up its own logical devices), from the repository root; returns the
    CompletedProcess after asserting a zero exit code."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "tf_secondorder.cli", *args],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def regression_data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    w = rng.normal(size=(8, 3)).astype("float32")
    y = np.tanh(x @ w).astype("float32")
    return x, y


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )


def weights_of(model):
    return [w.numpy() if hasattr(w, "numpy") else np.asarray(w) for w in model.weights]


def resume_mid_run(strategy, make_optimizer, path, check_restored=None):
    """(resumed, uninterrupted): a linear regression (Dense 8 -> 3, MSE,
    `regression_data`'s first 64 rows, batch 16) compiled with
    `make_optimizer()` under `strategy`; one model fit for 2 epochs, the
    other fit for 1, saved to `path`, loaded under `strategy`
    (`check_restored(model)` then looks at what the file brought back) and
    fit for 1 more."""
    x, y = regression_data()

    def model():
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        net.compile(optimizer=make_optimizer(), loss="mse")
        return net

    def fit(net, epochs):
        net.fit(x[:64], y[:64], batch_size=16, epochs=epochs, verbose=0, shuffle=False)

    with strategy.scope():
        uninterrupted, first = model(), model()
    fit(uninterrupted, 2)
    fit(first, 1)
    first.save(path)
    with strategy.scope():
        resumed = keras.saving.load_model(path)
    if check_restored is not None:
        check_restored(resumed)
    fit(resumed, 1)
    return resumed, uninterrupted


def optimizer_state(optimizer):
    """All optimizer variables as NumPy arrays (bfloat16 widened, exactly)."""
    return [
        np.asarray(v.numpy()).astype(np.float32) if v.dtype == "bfloat16" else v.numpy()
        for v in optimizer.variables
    ]


def replica_values(variable):
    """Per-replica component values of a (possibly mirrored) Keras variable."""
    value = variable.value if hasattr(variable, "value") else variable
    components = getattr(value, "values", None) or (value,)
    return [np.asarray(c.numpy()) for c in components]


def tape_step(model, optimizer, loss_fn):
    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def fit(model, optimizer, epochs=3, batch_size=16, **compile_kwargs):
    """Trains on `regression_data` with MSE; returns the loss per epoch."""
    x, y = regression_data()
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    history = model.fit(
        x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0
    )
    return history.history["loss"]


# -- float32 rounding bounds for comparing two different computations --------

# Unit roundoff of IEEE float32 with round-to-nearest: u = 2^-24.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
# Where `tfso.linalg`'s coupled Newton iteration stops: max|M - I| <= this in
# float32 (see tf_secondorder/linalg/roots.py).
NEWTON_STOP_TOLERANCE = 1e-6
# c in the backward error c·n·u·‖S‖ of a float32 inverse root (see
# `inverse_root_tolerance`).
EIGH_BACKWARD_CONSTANT = 4


def apply_test_thread_setting():
    """Applies `TFSO_TEST_INTRA_OP_THREADS` (see tests/conftest.py) to this
    process; call it before TensorFlow runs its first op."""
    threads = os.environ.get("TFSO_TEST_INTRA_OP_THREADS")
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))


def effective_epsilon(epsilon, method):
    """The relative ridge a float32 root uses: coupled Newton floors it at 10
    ulps of float32 (tf_secondorder/linalg/roots.py)."""
    if method == "coupled_newton":
        return max(epsilon, 10 * 1.2e-7)
    return epsilon


def reference_inverse_root(statistic, p, epsilon):
    """(S + ε·λ_max·I)^(-1/p) in float64 NumPy (negative eigenvalues of the
    rounded statistic clipped to 0, as the optimizer does)."""
    from tests.optimizers.shampoo_reference import reference_root

    return reference_root(np.asarray(statistic, np.float64), p, epsilon)


def inverse_root_tolerance(statistic, p, epsilon, method="eigh"):
    """Bound on ‖X̂ − X‖_F / ‖X‖₂ for a float32 root X̂ of the float32 matrix
    `statistic`, X = (S + r·I)^(-1/p) with r = ε·λ_max(S) the exact root.

    Derivation (u = 2^-24, n = the matrix side, λ⁺ = max(λ, 0)):

    * A backward-stable symmetric eigensolver returns the exact
      eigendecomposition of S + E with ‖E‖_F ≤ c·n·u·‖S‖_F: Householder
      tridiagonalisation and QR iterations are normwise backward stable with
      a modest multiple of n·u (Higham, Accuracy and Stability of Numerical
      Algorithms, §19.3); c = 4 (EIGH_BACKWARD_CONSTANT) covers that and
      the few extra roundings of the ridge and of λ^(-1/p). Measured on
      float32 statistics of sides 4 to 16: at most 0.42 of this bound with
      c = 1. A coupled-Newton iteration of matmuls has the same kind of
      backward error per product.
    * f(λ) = (λ⁺ + r)^(-1/p) has |f'| ≤ (1/p)·(λ_min⁺ + r)^(-1/p-1), so by the
      Daleckii–Krein bound ‖f(S+E) − f(S)‖_F ≤ max|f'|·‖E‖_F; divided by
      ‖X‖₂ = (λ_min⁺ + r)^(-1/p) that is c·n·u·‖S‖_F / (p·(λ_min⁺ + r)).
    * Q·diag(f(λ))·Qᵀ in float32 adds n·u·‖X‖₂ (length-n dot products).
    * Coupled Newton stops at max|M − I| ≤ δ = 1e-6 (NEWTON_STOP_TOLERANCE),
      where M = X̂ᵖ·(S + r·I) in exact arithmetic; ‖M − I‖₂ ≤ n·δ, so
      X̂ = X·(I + Δ)^(1/p) with ‖Δ‖ ≤ n·δ adds n·δ/p. (If rounding stops it
      earlier, its error is the rounding terms.) Each of its k iterations
      rounds p + 1 matmuls of length n, which the coupled form does not
      amplify but does not undo in X̂ either: k·(p+1)·n·u. The smallest
      eigenvalue of the scaled start, ≈ (p+1)·ε/2, grows by ≥ (1 + 1/p)^p
      per iteration until it is near 1, then ≤ 6 quadratic steps reach δ:
      k ≤ ln(2/((p+1)·ε)) / (p·ln(1 + 1/p)) + 6. Its ridge uses a
      64-step power-iteration estimate of λ_max: a Rayleigh quotient, so
      its error is quadratic in the eigenvector's (and it lies between λ₂
      and λ₁ when they are too close to separate).
    """
    s = np.asarray(statistic, np.float64)
    n = s.shape[0]
    eigenvalues = np.linalg.eigvalsh(s)
    top = max(float(eigenvalues[-1]), 0.0)
    if top == 0.0:
        return n * FLOAT32_UNIT_ROUNDOFF  # the identity, rounded
    epsilon = effective_epsilon(epsilon, method)
    smallest = max(float(eigenvalues[0]), 0.0) + epsilon * top
    u = FLOAT32_UNIT_ROUNDOFF
    c = EIGH_BACKWARD_CONSTANT
    tolerance = c * n * u * np.linalg.norm(s) / (p * smallest) + n * u
    if method == "coupled_newton":
        iterations = np.log(2 / ((p + 1) * epsilon)) / (p * np.log1p(1 / p)) + 6
        tolerance += n * NEWTON_STOP_TOLERANCE / p + iterations * (p + 1) * n * u
    return tolerance


def assert_root_matches_reference(root, statistic, p, epsilon, method, name=""):
    """The float32 root of `statistic` is within `inverse_root_tolerance` of
    the float64 root of the same float32 numbers."""
    want = reference_inverse_root(statistic, p, effective_epsilon(epsilon, method))
    error = np.linalg.norm(np.asarray(root, np.float64) - want)
    bound = inverse_root_tolerance(statistic, p, epsilon, method)
    assert error <= bound * np.linalg.norm(want, 2), (name, error, bound)
    return error / np.linalg.norm(want, 2)


class FactorView:
    """One factor's n×n matrix inside a stacked optimizer state ([rows, n, n],
    or [rows, n(n+1)/2] for packed statistics): reads and writes its row."""

    def __init__(self, variable, row, size):
        self.variable, self.row, self.size = variable, row, size

    def numpy(self):
        value = np.asarray(self.variable.numpy()[self.row])
        if value.ndim == 1:  # packed upper triangle, row by row
            full = np.zeros((self.size, self.size), value.dtype)
            rows, cols = np.triu_indices(self.size)
            full[rows, cols] = value
            full[cols, rows] = value
            return full
        return value

    def assign(self, value):
        whole = np.array(self.variable.numpy())
        value = np.asarray(value)
        if whole.ndim == 2:
            value = value[np.triu_indices(self.size)]
        whole[self.row] = value
        self.variable.assign(whole)


def factor_views(optimizer, kind):
    """Views of the optimizer's `kind` ("statistics", "preconditioner",
    "basis") of every factor, in the order of its layout's factors."""
    stacked = {
        "statistics": "_statistics",
        "preconditioner": "_preconditioners",
        "basis": "_bases",
    }[kind]
    variables = getattr(optimizer, stacked)
    return [
        FactorView(variables[f.slot], f.row, f.size) for f in optimizer._layout.factors
    ]


def factor_views_by_block(optimizer, kind):
    """{(variable index, block origin in its merged shape, axis): view}."""
    views = factor_views(optimizer, kind)
    return {
        (f.variable, f.origin, f.axis): view
        for f, view in zip(optimizer._layout.factors, views)
    }


def shampoo_factor_pairs(model, optimizer, block_size):
    """[(statistics view, preconditioner view, p)] of every factor of a
    built Shampoo, in its layout's order."""
    del model, block_size  # the layout knows both
    pairs = list(
        zip(
            factor_views(optimizer, "statistics"),
            factor_views(optimizer, "preconditioner"),
            [f.exponent for f in optimizer._layout.factors],
        )
    )
    assert pairs, "no Shampoo statistics found"
    return pairs


def widened(model, dtype="float64"):
    """The same Sequential model with its weights widened (exactly) to
    `dtype`: the reference for measuring a float32 run's rounding error."""
    layers = []
    for layer in model.layers:
        config = dict(layer.get_config(), dtype=dtype)
        layers.append(type(layer).from_config(config))
    copy = keras.Sequential([keras.Input(model.input_shape[1:], dtype=dtype)] + layers)
    copy.set_weights([w.astype(dtype) for w in model.get_weights()])
    return copy


# How far apart two float32 evaluations of one computation may be, in units
# of one evaluation's measured distance to its float64 evaluation; see
# `assert_agree_to_rounding`.
ROUNDING_SPREAD = 8


def assert_agree_to_rounding(got, want, exact, name="", factor=ROUNDING_SPREAD):
    """Two float32 evaluations `got` and `want` of the same computation agree
    to its float32 rounding error, measured against its float64 evaluation
    `exact` (same inputs, widened exactly). Each is an array or a list of
    arrays (e.g. all weights), compared as one vector.

    Each float32 evaluation differs from `exact` by its own rounding error;
    `want`'s is measured: gap = ‖want − exact‖. `got` evaluates the same
    operations rounded in other places or orders (replicas, batching, the
    batch of a root, another graph, XLA's few-ulp tanh/exp), so its error is
    of the same kind, and ‖got − want‖ ≤ ‖got − exact‖ + gap. Training
    amplifies rounding along its few least stable directions, so two such
    errors are random quantities whose ratio is not a constant: measured,
    ‖got − want‖ / gap ranged 0–3 over the comparisons in this suite. We
    allow `factor` = 8 (ROUNDING_SPREAD). The bugs these comparisons guard
    against (a wrong root, gradient or step) move the weights by ≥ 1e-3
    relative, where 8·gap is ~1e-5 relative. The floor of 4 ulps of ‖exact‖
    covers values both round (nearly) to the float64 ones (counters).
    """

    def flat(arrays):
        if not isinstance(arrays, (list, tuple)):
            arrays = [arrays]
        return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in arrays])

    got, want, exact = flat(got), flat(want), flat(exact)
    gap = np.linalg.norm(want - exact)
    floor = 4 * FLOAT32_UNIT_ROUNDOFF * np.linalg.norm(exact)
    diff = np.linalg.norm(got - want)
    assert diff <= factor * gap + floor, (name, diff, gap, floor)
