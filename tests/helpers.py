"""Small models and data shared by the tests."""

import keras
import numpy as np
import tensorflow as tf


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
