"""`digits-logreg`: a strongly convex task, where CR-PSGD's guarantee holds.

L2-regularised multinomial logistic regression on scikit-learn's digits
(1797 x 64, scaled to [0, 1]) with 20% of the labels replaced by another
class (a fixed draw): the noise keeps the classes from being separable, and
the L2 term on the weights and biases makes the objective

    f(W, b) = mean_i CE(softmax(W x_i + b), y_i) + λ/2 (‖W‖² + ‖b‖²)

strongly convex, so it satisfies the PL condition and has one minimiser.
f* comes from Newton's method on the full batch in float64 (the Hessian has
650² entries; a handful of iterations reach machine precision), solved
once per process. The metric is f − f* on all 1797 examples.
"""

import functools

import keras
import numpy as np
import tensorflow as tf

from tf_secondorder.bench.tasks.data import digits_images
from tf_secondorder.bench.tasks.registry import Task, register

NOISE = 0.2
L2 = 1e-3  # λ
CLASSES = 10


def noisy_digits(data_dir=None):
    """(images [1797, 64] float32, labels int32) with a fixed 20% of the
    labels moved to another class, uniformly."""
    x, y = digits_images(data_dir)
    rng = np.random.default_rng(2019)
    flipped = rng.random(len(y)) < NOISE
    shift = rng.integers(1, CLASSES, size=len(y))
    noisy = np.where(flipped, (y + shift) % CLASSES, y).astype("int32")
    return x, noisy


def objective(weights, bias, x, y, l2=L2):
    """f(W, b) in float64, NumPy."""
    logits = x.astype(np.float64) @ weights + bias
    logits -= logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(axis=1))
    cross_entropy = np.mean(log_z - logits[np.arange(len(y)), y])
    return cross_entropy + 0.5 * l2 * (np.sum(weights**2) + np.sum(bias**2))


def newton_optimum(x, y, l2=L2, tolerance=1e-12, max_iterations=50):
    """(W*, b*, f*) by Newton's method on the full batch, in float64."""
    features = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
    n, d = features.shape
    theta = np.zeros((d, CLASSES))
    onehot = np.eye(CLASSES)[y]
    for _ in range(max_iterations):
        logits = features @ theta
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = features.T @ (p - onehot) / n + l2 * theta
        if np.abs(grad).max() < tolerance:
            break
        # Hessian of the mean cross-entropy, block (k, l) of classes:
        # (1/n) Σ_i (p_ik δ_kl − p_ik p_il) x_i x_iᵀ, one matmul per block.
        hessian = np.empty((CLASSES, d, CLASSES, d))
        for k in range(CLASSES):
            for m in range(k, CLASSES):
                weight = -p[:, k] * p[:, m] + (p[:, k] if k == m else 0.0)
                block = (features * weight[:, None]).T @ features / n
                hessian[k, :, m, :] = block
                hessian[m, :, k, :] = block.T
        hessian = hessian.reshape(CLASSES * d, CLASSES * d)
        hessian += l2 * np.eye(CLASSES * d)
        step = np.linalg.solve(hessian, grad.T.reshape(-1)).reshape(CLASSES, d).T
        theta -= step
    weights, bias = theta[:-1], theta[-1]
    return weights, bias, objective(weights, bias, x, y, l2)


@functools.lru_cache(maxsize=4)
def _optimum(data_dir):
    x, y = noisy_digits(data_dir)
    return newton_optimum(x, y)


@register(
    "digits-logreg",
    steps=1400,
    eval_every=100,
    description="regularised softmax regression on the digits with noisy "
    "labels (strongly convex); f - f*",
)
def digits_logistic(steps=1400, batch_size=128, data_dir=None):
    """`digits-logreg`: f − f* of regularised softmax regression (see module)."""
    x, y = noisy_digits(data_dir)
    _, _, optimum = _optimum(data_dir)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make_model(seed):
        keras.utils.set_random_seed(seed)
        # Keras's L2(c) adds c·Σw²: c = λ/2.
        return keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(
                    CLASSES,
                    kernel_regularizer=keras.regularizers.L2(L2 / 2),
                    bias_regularizer=keras.regularizers.L2(L2 / 2),
                    dtype="float32",
                ),
            ],
            name="digits_logreg",
        )

    def make_examples(seed):
        data = tf.data.Dataset.from_tensor_slices((x, y))
        return data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)

    def make_dataset(seed, batch_size=batch_size):
        examples = make_examples(seed).repeat()
        return examples.batch(batch_size, drop_remainder=True).prefetch(2)

    def evaluate(model):
        # In float64 from the weights: f − f* is resolved far below float32's
        # rounding of f itself.
        kernel, bias = (w.numpy() for w in model.layers[-1].weights)
        return float(objective(kernel, bias, x, y) - optimum)

    return Task(
        name="digits-logreg",
        steps=steps,
        eval_every=100,
        batch_size=batch_size,
        make_model=make_model,
        make_dataset=make_dataset,
        evaluate=evaluate,
        loss=loss_fn,
        lrs=(0.1, 0.3, 1.0),
        make_examples=make_examples,
        info={
            "examples": int(len(x)),
            "metric": "f - f* (regularised training objective)",
            "f_star": float(optimum),
            "l2": L2,
            "label_noise": NOISE,
            "source": "TFDS (sklearn_digits, built offline)",
        },
    )
