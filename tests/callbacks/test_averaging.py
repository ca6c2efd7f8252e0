"""IterateAveraging: the mean of the iterates against NumPy's, evaluation and
export with the mean, training on from the last iterate, MirroredStrategy."""

import keras
import numpy as np
import pytest

import tf_secondorder as tfso
from tests.helpers import mlp, regression_data, replica_values


class _IterateRecorder(keras.callbacks.Callback):
    """The trainable weights after every step, with the optimizer's step."""

    def __init__(self):
        super().__init__()
        self.iterates = {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.iterates[step] = [w.numpy() for w in self.model.trainable_variables]


def _train(averaging, epochs=3, optimizer=None, strategy=None, recorder=None):
    x, y = regression_data()
    scope = strategy.scope() if strategy is not None else _Null()
    with scope:
        model = mlp()
        model.compile(optimizer=optimizer or keras.optimizers.Adam(0.01), loss="mse")
    recorder = recorder or _IterateRecorder()
    model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=[averaging, recorder],
    )
    return model, recorder


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def _numpy_mean(iterates, start_step, every):
    """float64 mean of the recorded iterates the callback should average."""
    chosen = [
        weights
        for step, weights in sorted(iterates.items())
        if step >= start_step and (step - start_step) % every == 0
    ]
    return len(chosen), [
        np.mean([w[i].astype(np.float64) for w in chosen], axis=0)
        for i in range(len(chosen[0]))
    ]


# The running mean rounds once per added iterate: after n of them the float32
# result is within about n·u·max|w| of the float64 mean (u = 2^-24); 8 u per
# step leaves room for the cast of 1/n and the subtraction.
def _assert_mean(got, want, n):
    for g, w in zip(got, want, strict=True):
        bound = 8 * n * 2.0**-24 * max(1.0, float(np.max(np.abs(w))))
        np.testing.assert_allclose(g, w, rtol=0, atol=bound)


@pytest.mark.parametrize("start_step, every", [(0, 1), (10, 1), (5, 3)])
def test_the_model_ends_with_the_mean_of_the_chosen_iterates(start_step, every):
    averaging = tfso.callbacks.IterateAveraging(start_step=start_step, every=every)
    model, recorder = _train(averaging)
    n, want = _numpy_mean(recorder.iterates, start_step, every)
    assert averaging.count == n
    _assert_mean([w.numpy() for w in model.trainable_variables], want, n)
    _assert_mean(averaging.averaged_weights(), want, n)
    # The mean is not the last iterate (the test would pass vacuously if the
    # callback did nothing).
    last = recorder.iterates[max(recorder.iterates)]
    assert not np.allclose(last[0], want[0], atol=1e-4)


def test_evaluate_uses_the_mean_and_puts_the_iterate_back():
    x, y = regression_data()
    averaging = tfso.callbacks.IterateAveraging(start_step=8, apply_at_end=False)
    model, recorder = _train(averaging)
    last = recorder.iterates[max(recorder.iterates)]
    for w, want in zip(model.trainable_variables, last, strict=True):
        np.testing.assert_array_equal(w.numpy(), want)  # apply_at_end=False
    last_loss = model.evaluate(x, y, verbose=0)
    averaged_loss = model.evaluate(x, y, verbose=0, callbacks=[averaging])
    for w, want in zip(model.trainable_variables, last, strict=True):
        np.testing.assert_array_equal(w.numpy(), want)  # swapped back
    # The same model holding the mean, evaluated without the callback.
    for w, mean in zip(
        model.trainable_variables, averaging.averaged_weights(), strict=True
    ):
        w.assign(mean)
    assert averaged_loss == pytest.approx(model.evaluate(x, y, verbose=0), rel=1e-6)
    assert averaged_loss != pytest.approx(last_loss, rel=1e-3)


def test_validation_in_fit_sees_the_mean():
    x, y = regression_data()
    averaging = tfso.callbacks.IterateAveraging(start_step=0)
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    history = model.fit(
        x,
        y,
        epochs=2,
        batch_size=16,
        shuffle=False,
        verbose=0,
        validation_data=(x, y),
        callbacks=[averaging],
    )
    # At the end the model holds the mean, so evaluating it now gives the
    # last validation loss.
    assert history.history["val_loss"][-1] == pytest.approx(
        model.evaluate(x, y, verbose=0), rel=1e-6
    )


def test_a_second_fit_trains_on_from_the_last_iterate_and_keeps_averaging():
    x, y = regression_data()
    averaging = tfso.callbacks.IterateAveraging(start_step=0)
    recorder = _IterateRecorder()
    model, _ = _train(averaging, epochs=2, recorder=recorder)
    last = recorder.iterates[max(recorder.iterates)]

    class _Start(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.weights = [w.numpy() for w in self.model.trainable_variables]

    start = _Start()
    model.fit(
        x,
        y,
        epochs=1,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=[averaging, start, recorder],
    )
    for got, want in zip(start.weights, last, strict=True):
        np.testing.assert_array_equal(got, want)
    n, want = _numpy_mean(recorder.iterates, 0, 1)
    assert averaging.count == n == 24
    _assert_mean([w.numpy() for w in model.trainable_variables], want, n)


def test_a_saved_model_holds_the_mean(tmp_path):
    averaging = tfso.callbacks.IterateAveraging(start_step=4)
    model, recorder = _train(averaging)
    n, want = _numpy_mean(recorder.iterates, 4, 1)
    path = str(tmp_path / "averaged.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    _assert_mean([w.numpy() for w in loaded.trainable_variables], want, n)


def test_under_mirrored_strategy_every_replica_holds_the_same_mean(mirrored):
    strategy = mirrored
    averaging = tfso.callbacks.IterateAveraging(start_step=3)
    model, recorder = _train(averaging, strategy=strategy)
    n, want = _numpy_mean(recorder.iterates, 3, 1)
    assert averaging.count == n
    for variable, mean in zip(model.trainable_variables, want, strict=True):
        first, second = replica_values(variable)
        np.testing.assert_array_equal(first, second)
        _assert_mean([first], [mean], n)


def test_with_a_package_optimizer():
    averaging = tfso.callbacks.IterateAveraging(start_step=6)
    model, recorder = _train(
        averaging, optimizer=tfso.Shampoo(0.01, precondition_frequency=4)
    )
    n, want = _numpy_mean(recorder.iterates, 6, 1)
    _assert_mean([w.numpy() for w in model.trainable_variables], want, n)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"start_step": -1}, "start_step"),
        ({"every": 0}, "every"),
        ({"start_step": 1.5}, "start_step"),
        ({"apply_at_end": "yes"}, "apply_at_end"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        tfso.callbacks.IterateAveraging(**kwargs)
