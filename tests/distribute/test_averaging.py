"""Local SGD (`average_every`) under MirroredStrategy in model.fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import mlp, regression_data, replica_values, weights_of
from tf_secondorder.compat import testing


def linear(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])


class RecordReplicas(keras.callbacks.Callback):
    """Per-replica kernel values after every batch (runs after SyncReplicas)."""

    def __init__(self):
        super().__init__()
        self.kernels, self.slots = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.kernels.append(replica_values(self.model.trainable_variables[0]))
        optimizer = self.model.optimizer
        slots = [v for v in optimizer.variables if v.path.endswith("kernel_momentum")]
        self.slots.append(replica_values(slots[0]) if slots else None)


def train(strategy, make_optimizer, steps, batch_size=16, model=linear, **fit_kwargs):
    x, y = regression_data()
    with strategy.scope():
        net = model()
        optimizer = make_optimizer()
        net.compile(optimizer=optimizer, loss="mse")
    recorder = RecordReplicas()
    net.fit(
        x[: steps * batch_size],
        y[: steps * batch_size],
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[recorder],
        **fit_kwargs,
    )
    return net, optimizer, recorder


def sgd(**options):
    return lambda: tfso.distributed(keras.optimizers.SGD(0.1, momentum=0.9), **options)


def reference_local_sgd(steps, every, lr=0.1, momentum=0.9, batch_size=16):
    """NumPy: 2 replicas, each on its half of every batch; weights and
    momenta averaged every `every` steps (and at the end)."""
    x, y = regression_data()
    model = linear()
    kernel, bias = (w.numpy().astype(np.float64) for w in model.weights)
    replicas = [
        {"w": kernel.copy(), "b": bias.copy(), "mw": 0 * kernel, "mb": 0 * bias}
        for _ in range(2)
    ]
    half = batch_size // 2
    for t in range(steps):
        for r, state in enumerate(replicas):
            start = t * batch_size + r * half
            xb, yb = x[start : start + half], y[start : start + half]
            error = xb @ state["w"] + state["b"] - yb
            grad_w = 2 * xb.T @ error / error.size
            grad_b = 2 * error.sum(0) / error.size
            state["mw"] = momentum * state["mw"] - lr * grad_w
            state["mb"] = momentum * state["mb"] - lr * grad_b
            state["w"] = state["w"] + state["mw"]
            state["b"] = state["b"] + state["mb"]
        if (t + 1) % every == 0 or t == steps - 1:
            for key in replicas[0]:
                mean = (replicas[0][key] + replicas[1][key]) / 2
                for state in replicas:
                    state[key] = mean.copy()
    return replicas[0]["w"], replicas[0]["b"]


def test_matches_numpy_reference_of_local_sgd(mirrored):
    net, _, recorder = train(mirrored, sgd(average_every=3), steps=7)
    kernel, bias = reference_local_sgd(steps=7, every=3)
    np.testing.assert_allclose(net.weights[0].numpy(), kernel, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(net.weights[1].numpy(), bias, rtol=2e-5, atol=2e-6)
    # The reference itself must depend on the schedule.
    other, _ = reference_local_sgd(steps=7, every=7)
    assert np.abs(other - kernel).max() > 1e-4


def test_every_one_equals_synchronous_training(mirrored):
    local, _, _ = train(mirrored, sgd(average_every=1), steps=8)
    synchronous, _, _ = train(mirrored, sgd(), steps=8)
    for a, b in zip(weights_of(local), weights_of(synchronous)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and it is not a no-op: training moved the weights.
    assert np.abs(weights_of(local)[0] - weights_of(linear())[0]).max() > 1e-2


def test_replicas_differ_between_averages_and_are_equal_after(mirrored):
    _, optimizer, recorder = train(
        mirrored, sgd(average_every=4, average_warmup_steps=2), steps=9
    )
    diffs = [np.abs(a - b).max() for a, b in recorder.kernels]
    slot_diffs = [np.abs(a - b).max() for a, b in recorder.slots]
    # steps 1-2 synchronous, 3-5 local, 6 averaged, 7-9 local
    assert diffs[0] == diffs[1] == 0
    assert min(diffs[2:5]) > 1e-5 and min(diffs[6:9]) > 1e-5
    assert diffs[5] == 0 and slot_diffs[5] == 0 and min(slot_diffs[2:5]) > 1e-5
    # 2 synchronous all-reduces, the average after step 6 and the one at the
    # end of fit: rounds counted, replicas equal afterwards.
    assert optimizer.communication_stats()["rounds"] == 4
    for variable in optimizer.averaged_variables():
        a, b = replica_values(variable)
        np.testing.assert_array_equal(a, b)


def test_evaluate_and_predict_see_the_average(mirrored):
    """A custom strategy.run loop leaves replicas apart; evaluate averages."""
    x, y = regression_data()
    with mirrored.scope():
        net = linear()
        optimizer = sgd(average_every=100)()
        net.compile(optimizer=optimizer, loss="mse")
        optimizer.build(net.trainable_variables)
    data = mirrored.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(16)
    )

    @tf.function
    def step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(net(xb) - yb)) / 2
            grads = tape.gradient(loss, net.trainable_variables)
            optimizer.apply_gradients(zip(grads, net.trainable_variables))

        mirrored.run(replica_step, args=batch)

    for batch in data:
        step(batch)
    a, b = replica_values(net.weights[0])
    assert optimizer.replicas_differ() and np.abs(a - b).max() > 1e-5
    net.evaluate(x[:16], y[:16], verbose=0)
    a2, b2 = replica_values(net.weights[0])
    np.testing.assert_array_equal(a2, b2)
    np.testing.assert_allclose(a2, (a + b) / 2, rtol=1e-6)
    assert optimizer.communication_stats()["rounds"] == 1
    net.predict(x[:16], verbose=0)  # already equal: no further round
    assert optimizer.communication_stats()["rounds"] == 1


def test_saved_and_exported_models_carry_the_average(mirrored, tmp_path):
    net, _, recorder = train(mirrored, sgd(average_every=100), steps=5)
    last = recorder.kernels[-1]
    assert np.abs(last[0] - last[1]).max() > 1e-5
    expected = (last[0] + last[1]) / 2
    np.testing.assert_allclose(net.weights[0].numpy(), expected, rtol=1e-6)
    net.save(tmp_path / "local.keras")
    loaded = keras.saving.load_model(tmp_path / "local.keras")
    np.testing.assert_allclose(loaded.weights[0].numpy(), expected, rtol=1e-6)
    net.export(tmp_path / "exported", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    x = regression_data()[0][:4]
    want = x @ expected + net.weights[1].numpy()
    np.testing.assert_allclose(served.serve(x).numpy(), want, rtol=1e-5, atol=1e-6)


def test_batch_frequency_checkpoints_see_the_average(mirrored, tmp_path):
    path = tmp_path / "ckpt.weights.h5"
    checkpoint = keras.callbacks.ModelCheckpoint(
        path, save_weights_only=True, save_freq=3
    )
    x, y = regression_data()
    with mirrored.scope():
        net = linear()
        net.compile(optimizer=sgd(average_every=100)(), loss="mse")
    net.fit(
        x[:48], y[:48], batch_size=16, verbose=0, shuffle=False, callbacks=[checkpoint]
    )
    saved = linear(seed=1)
    saved.load_weights(path)
    np.testing.assert_allclose(
        saved.weights[0].numpy(), net.weights[0].numpy(), rtol=1e-6
    )


def test_resume_after_save_equals_uninterrupted_run(mirrored, tmp_path):
    x, y = regression_data()

    def make():
        return tfso.distributed(keras.optimizers.Adam(0.01), average_every=3)

    def fit(net, epochs):
        net.fit(x[:64], y[:64], batch_size=16, epochs=epochs, verbose=0, shuffle=False)

    with mirrored.scope():
        uninterrupted = mlp()
        uninterrupted.compile(optimizer=make(), loss="mse")
    fit(uninterrupted, 2)  # 4 steps per epoch: averages at 3, 4 (epoch), 6, 8
    with mirrored.scope():
        first = mlp()
        first.compile(optimizer=make(), loss="mse")
    fit(first, 1)
    first.save(tmp_path / "first.keras")
    with mirrored.scope():
        resumed = keras.saving.load_model(tmp_path / "first.keras")
    assert resumed.optimizer.communication.average_every == 3
    fit(resumed, 1)
    for a, b in zip(weights_of(resumed), weights_of(uninterrupted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The check can fail: Adam restarted on the saved weights drifts.
    with mirrored.scope():
        restarted = mlp()
        restarted.set_weights(first.get_weights())
        restarted.compile(optimizer=make(), loss="mse")
    fit(restarted, 1)
    drift = max(
        np.abs(a - b).max()
        for a, b in zip(weights_of(restarted), weights_of(uninterrupted))
    )
    assert drift > 1e-4


def test_shampoo_replicas_refresh_from_their_own_statistics(mirrored):
    make = lambda: tfso.Shampoo(  # noqa: E731
        learning_rate=0.01,
        precondition_frequency=2,
        average_every=100,
        block_size=8,
    )
    x, y = regression_data()
    with mirrored.scope():
        net = mlp()
        optimizer = make()
        net.compile(optimizer=optimizer, loss="mse")
    seen = {}

    class Grab(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:  # after the refresh of step 2 and a local step 3
                for v in optimizer.variables:
                    if "statistics" in v.path or "preconditioner" in v.path:
                        seen[v.path] = replica_values(v)

    net.fit(x[:48], y[:48], batch_size=16, verbose=0, shuffle=False, callbacks=[Grab()])
    stats = {k: v for k, v in seen.items() if "statistics" in k}
    roots = {k.replace("statistics", "preconditioner"): v for k, v in stats.items()}
    assert stats and all(np.abs(a - b).max() > 0 for a, b in stats.values())
    assert all(np.abs(a - b).max() > 0 for a, b in (seen[k] for k in roots))
    assert np.isfinite(weights_of(net)[0]).all()
    assert int(optimizer.root_failures.numpy()) == 0


def test_callback_hook_is_called_by_fit_evaluate_and_predict(mirrored):
    """`fit`, `evaluate` and `predict` must get SyncReplicas automatically
    (the CallbackList wrapper in compat.keras_patches)."""
    x, y = regression_data()
    with mirrored.scope():
        net = linear()
        net.compile(optimizer=sgd(average_every=2)(), loss="mse")
    with testing.count_hook_calls() as calls:
        net.fit(x[:32], y[:32], batch_size=16, verbose=0)
        net.evaluate(x[:16], y[:16], verbose=0)
        net.predict(x[:16], verbose=0)
    assert calls["callbacks"] == 3
    lists = keras.callbacks.CallbackList([], model=net)
    assert isinstance(lists.callbacks[0], tfso.callbacks.SyncReplicas)
    plain = linear()
    plain.compile(optimizer="sgd", loss="mse")
    assert keras.callbacks.CallbackList([], model=plain).callbacks == []


def test_config_round_trip():
    optimizer = tfso.Shampoo(average_every=8, average_warmup_steps=100)
    clone = tfso.Shampoo.from_config(optimizer.get_config())
    assert (
        clone.communication.average_every,
        clone.communication.average_warmup_steps,
    ) == (8, 100)
    wrapped = tfso.distributed("adam", average_every=4)
    again = type(wrapped).from_config(wrapped.get_config())
    assert again.communication.average_every == 4


def test_single_device_trains_as_usual():
    """Without a strategy there is one replica: local SGD changes nothing."""
    x, y = regression_data()
    results = []
    for options in ({}, {"average_every": 4}):
        net = linear()
        net.compile(optimizer=sgd(**options)(), loss="mse")
        net.fit(x, y, batch_size=16, verbose=0, shuffle=False)
        results.append(weights_of(net))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"average_every": 0}, "average_every"),
        ({"average_every": -2}, "average_every"),
        ({"average_every": 2.5}, "average_every"),
        ({"average_every": True}, "average_every"),
        ({"average_every": 4, "average_warmup_steps": -1}, "average_warmup_steps"),
        ({"average_warmup_steps": 10}, "average_warmup_steps"),
        ({"average_every": 4, "compression": "sign"}, "average_every"),
    ],
)
def test_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tfso.distributed("sgd", **kwargs)
    with pytest.raises(ValueError, match=name):
        tfso.Shampoo(**kwargs)


def test_distribute_roots_true_with_local_sgd_is_rejected():
    with pytest.raises(ValueError, match="distribute_roots"):
        tfso.Shampoo(average_every=4, distribute_roots=True)
    with pytest.raises(ValueError, match="distribute_roots"):
        tfso.SOAP(average_every=4, distribute_roots=True)


def test_soap_keeps_a_basis_per_replica_and_averages_the_rest(mirrored):
    """An average of two eigenbases is no basis: each replica keeps its own
    (and the second moment kept in it); weights, first moments and
    statistics are averaged, and the next refresh starts from those."""
    x, y = regression_data()
    with mirrored.scope():
        net = mlp()
        opt = tfso.SOAP(0.01, block_size=8, precondition_frequency=2, average_every=3)
        net.compile(optimizer=opt, loss="mse")
    # 6 steps: refreshes at 1, 3, 5; averages after steps 3 and 6.
    net.fit(x[:96], y[:96], batch_size=16, epochs=1, shuffle=False, verbose=0)
    u = 2.0**-24
    bases = [v for v in opt.variables if "_basis_" in v.path]
    assert bases
    differ = False
    for basis in bases:
        per_replica = replica_values(basis)
        for stack in per_replica:
            for q in stack:  # one basis per block
                n = q.shape[0]
                # QR / eigh give orthonormal columns to a few n·u.
                np.testing.assert_allclose(q.T @ q, np.eye(n), atol=10 * n * u)
        differ |= np.abs(per_replica[0] - per_replica[1]).max() > 0
    assert differ  # not averaged
    for variable in list(net.weights) + [
        v
        for v in opt.variables
        if "statistics" in v.path or v.path.endswith("momentum")
    ]:
        a, b = replica_values(variable)
        np.testing.assert_array_equal(a, b, err_msg=variable.path)


def test_bytes_per_step_are_zero_on_local_steps(mirrored):
    x, y = regression_data()
    with mirrored.scope():
        net = linear()
        opt = sgd(average_every=4)()
        net.compile(optimizer=opt, loss="mse")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(
            opt.communication_stats()["bytes_per_step"]
        )
    )
    net.fit(
        x[:96],
        y[:96],
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[record],
    )
    # kernel, bias and the momentum slots: 8·3 + 3 floats, twice.
    averaged = 2 * 4 * (8 * 3 + 3)
    assert seen == [0, 0, 0, averaged, 0, 0]
