"""Shampoo for the matrices, Adam for chosen variables (embeddings) in one
model, through `exclude_from_preconditioning`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso


def _model(vocabulary=50):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, 8, name="embedding")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="tanh", name="hidden")(x)
    outputs = keras.layers.Dense(1, name="out")(x)
    return keras.Model(inputs, outputs)


def _data(n=64, vocabulary=50):
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocabulary, size=(n, 6)).astype("int32")
    y = (x.sum(axis=1, keepdims=True) / (6.0 * vocabulary)).astype("float32")
    return x, y


def _train(optimizer, steps=6):
    model = _model()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=steps // 4, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize(
    "make, effective_epsilon",
    [
        (tfso.Shampoo, lambda o: o.grafting_epsilon),
        # SOAP writes Adam as its authors do, lr·sqrt(1 - beta2^t)/(1 - beta1^t)
        # · m / (sqrt(v) + eps): at step 1 that is eps / sqrt(1 - beta2).
        (tfso.SOAP, lambda o: o.epsilon / np.sqrt(1.0 - o.beta2)),
    ],
    ids=["shampoo", "soap"],
)
def test_excluded_embedding_gets_adams_update(make, effective_epsilon):
    # Adam's first step from zero moments is lr * g / (|g| + eps) per
    # element (bias corrections cancel), computed here in NumPy from the
    # dense gradient. (Keras's own Adam is no reference: on the embedding's
    # IndexedSlices with repeated rows it adds each row's square
    # separately.)
    x, y = _data(16)
    model = _model()
    initial = model.get_layer("embedding").embeddings.numpy()
    with tf.GradientTape() as tape:
        loss = keras.losses.mean_squared_error(y[:, 0], model(x)[:, 0])
        loss = tf.reduce_mean(loss)
    grad = tf.convert_to_tensor(
        tape.gradient(loss, model.get_layer("embedding").embeddings)
    ).numpy()
    # precondition_1d: the (16, 1) output kernel gets statistics too.
    optimizer = make(0.01, precondition_frequency=1, precondition_1d=True)
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.exclude_from_preconditioning(var_names=["embedding"])
    model.train_on_batch(x, y)
    epsilon = effective_epsilon(optimizer)
    expected = initial - 0.01 * grad / (np.abs(grad) + epsilon)
    np.testing.assert_allclose(
        model.get_layer("embedding").embeddings.numpy(),
        expected,
        rtol=0,
        atol=1e-6,  # float32 rounding of the weights and of an lr-sized step
    )
    # No statistics for the embedding, statistics for both Dense kernels.
    with_factors = {
        v.path
        for v in model.trainable_variables
        if optimizer._layout.plans[optimizer._get_variable_index(v)].factors
    }
    assert not any("embedding" in p for p in with_factors), with_factors
    assert any("hidden" in p for p in with_factors), with_factors
    assert any("out" in p for p in with_factors), with_factors


def test_exclusion_by_variable_trains_and_saves(tmp_path):
    model = _model()
    optimizer = tfso.Shampoo(0.01, precondition_frequency=2)
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.exclude_from_preconditioning(var_list=[model.get_layer("hidden").bias])
    x, y = _data()
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before
    assert not optimizer.is_preconditioned(model.get_layer("hidden").bias)
    assert optimizer.is_preconditioned(model.get_layer("hidden").kernel)


def test_bad_arguments_and_late_call():
    optimizer = tfso.Shampoo()
    with pytest.raises(ValueError, match="`var_names` must be a list of non-empty"):
        optimizer.exclude_from_preconditioning(var_names=[""])
    with pytest.raises(ValueError, match="`var_names` must be a list or tuple"):
        optimizer.exclude_from_preconditioning(var_names="embedding")
    model = _model()
    model.compile(optimizer=optimizer, loss="mse")
    model.train_on_batch(*_data(16))
    with pytest.raises(ValueError, match="before the optimizer is built"):
        optimizer.exclude_from_preconditioning(var_names=["embedding"])
