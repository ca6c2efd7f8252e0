"""Growing batch sizes (CR-PSGD), micro-batches and Catalyst."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import regression_data, weights_of
from tf_secondorder.compat import testing
from tf_secondorder.data import GrowingBatchSchedule, growing_batches


def test_batch_sizes_follow_the_schedule_exactly():
    schedule = GrowingBatchSchedule(5, 1.7, 1000)
    sizes = schedule.batch_sizes()
    expected, t = [], 0
    while sum(expected) + math.floor(1.7**t * 5) < 1000:
        expected.append(math.floor(1.7**t * 5))
        t += 1
    expected.append(1000 - sum(expected))
    assert sizes == expected and sum(sizes) == 1000
    assert len(schedule) == len(sizes) == 10  # O(log T) rounds


def test_cap_stages_and_multiples():
    capped = GrowingBatchSchedule(4, 2, 100, max_batch_size=16)
    assert capped.batch_sizes() == [4, 8, 16, 16, 16, 16, 16, 8]
    staged = GrowingBatchSchedule(4, 2, 100, stages=2)
    assert staged.batch_sizes() == [4, 8, 16, 22, 4, 8, 16, 22]
    assert staged.stage_starts() == [0, 4]
    even = GrowingBatchSchedule(3, 1.5, 40, multiple_of=2)
    assert even.batch_sizes() == [2, 4, 6, 10, 14, 4]
    assert sum(even.batch_sizes()) == 40


def test_dataset_yields_the_schedule_and_exactly_the_budget():
    schedule = GrowingBatchSchedule(3, 1.5, 100)
    data = growing_batches(tf.data.Dataset.range(17), schedule)
    batches = [b.numpy() for b in data]
    assert [len(b) for b in batches] == schedule.batch_sizes()
    assert int(data.cardinality()) == len(schedule)
    # in order, the 17 examples repeated until 100 are taken
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(100) % 17)


def fit_growing(strategy, schedule, micro=None, theta=0.0, lr=0.05, model=None):
    x, y = regression_data()
    scope = strategy.scope() if strategy else _null()
    with scope:
        net = (model or linear)()
        net.compile(optimizer=tfso.distributed(keras.optimizers.SGD(lr)), loss="mse")
    if micro or theta:
        tfso.data.train_in_micro_batches(net, micro, theta, schedule)
    data = growing_batches(tf.data.Dataset.from_tensor_slices((x, y)), schedule)
    history = net.fit(data, epochs=1, verbose=0)
    return net, history.history["loss"][0]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False


def linear(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])


def reference(schedule, theta=0.0, lr=0.05):
    """NumPy SGD on the linear model over the schedule's batches."""
    x, y = regression_data()
    w, b = (v.numpy().astype(np.float64) for v in linear().weights)
    anchor = None
    position = 0
    starts = set(schedule.stage_starts())
    for t, size in enumerate(schedule.batch_sizes()):
        rows = np.arange(position, position + size) % len(x)
        position += size
        xb, yb = x[rows], y[rows]
        if t in starts:
            anchor = (w.copy(), b.copy())
        error = xb @ w + b - yb
        grad_w, grad_b = 2 * xb.T @ error / error.size, 2 * error.sum(0) / error.size
        if theta:
            grad_w, grad_b = (
                grad_w + theta * (w - anchor[0]),
                grad_b + theta * (b - anchor[1]),
            )
        w, b = w - lr * grad_w, b - lr * grad_b
    return w, b


def test_fit_matches_numpy_and_rounds_equal_batches(mirrored):
    schedule = GrowingBatchSchedule(8, 1.5, 400, multiple_of=2)
    net, _ = fit_growing(mirrored, schedule)
    w, b = reference(schedule)
    np.testing.assert_allclose(net.weights[0].numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.weights[1].numpy(), b, rtol=1e-5, atol=1e-6)
    assert net.optimizer.communication_stats()["rounds"] == len(schedule)
    assert int(net.optimizer.iterations.numpy()) == len(schedule)


def bounded(micro):
    """A linear model that fails if a forward pass sees more than `micro` rows."""

    def check(x):
        tf.debugging.assert_less_equal(tf.shape(x)[0], micro)
        return x

    def make():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((8,)), keras.layers.Lambda(check), keras.layers.Dense(3)]
        )

    return make


def test_micro_batches_equal_whole_batches_with_bounded_memory(mirrored):
    schedule = GrowingBatchSchedule(8, 2.0, 300, multiple_of=2)
    whole, whole_loss = fit_growing(None, schedule)
    with testing.count_hook_calls() as calls:
        micro, micro_loss = fit_growing(None, schedule, micro=5, model=bounded(5))
    assert calls["loss_tracker"] > 0
    for a, b in zip(weights_of(whole), weights_of(micro)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert micro_loss == pytest.approx(whole_loss, rel=1e-5)
    with pytest.raises(Exception, match="assert"):
        fit_growing(None, schedule, micro=None, model=bounded(5))
    mirrored_micro, _ = fit_growing(mirrored, schedule, micro=3, model=bounded(3))
    for a, b in zip(weights_of(whole), weights_of(mirrored_micro)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert mirrored_micro.optimizer.communication_stats()["rounds"] == len(schedule)


def test_catalyst_matches_numpy_reference(mirrored):
    schedule = GrowingBatchSchedule(4, 2.0, 240, stages=3, multiple_of=2)
    net, _ = fit_growing(mirrored, schedule, micro=4, theta=0.5)
    w, b = reference(schedule, theta=0.5)
    np.testing.assert_allclose(net.weights[0].numpy(), w, rtol=1e-5, atol=1e-6)
    plain_w, _ = reference(schedule)
    assert np.abs(plain_w - w).max() > 1e-3  # θ changes the result


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"growth_factor": 1.0}, "growth_factor"),
        ({"growth_factor": 0.5}, "growth_factor"),
        ({"growth_factor": "2"}, "growth_factor"),
        ({"initial_batch_size": 0}, "initial_batch_size"),
        ({"sample_budget": 0}, "sample_budget"),
        ({"max_batch_size": 2}, "max_batch_size"),
        ({"stages": 0}, "stages"),
        ({"multiple_of": 0}, "multiple_of"),
    ],
)
def test_bad_schedule(kwargs, name):
    args = {"initial_batch_size": 4, "growth_factor": 2.0, "sample_budget": 100}
    with pytest.raises(ValueError, match=name):
        GrowingBatchSchedule(**{**args, **kwargs})


def test_bad_train_step_arguments():
    schedule = GrowingBatchSchedule(4, 2.0, 100)
    net = linear()
    with pytest.raises(ValueError, match="catalyst_theta"):
        tfso.data.train_in_micro_batches(net, 4, catalyst_theta=-0.1, schedule=schedule)
    with pytest.raises(ValueError, match="schedule"):
        tfso.data.train_in_micro_batches(net, 4, catalyst_theta=0.1)
    with pytest.raises(ValueError, match="micro_batch_size"):
        tfso.data.train_in_micro_batches(net, 0)
    with pytest.raises(ValueError, match="dataset"):
        growing_batches([1, 2, 3], schedule)


@pytest.mark.parametrize("budget, replicas", [(38400, 2), (10000, 1), (179700, 8)])
def test_catalyst_takes_the_papers_stages_and_stage_budget(budget, replicas):
    schedule = tfso.data.GrowingBatchSchedule.catalyst(8, 1.05, budget, replicas)
    # ⌊√(NT)⌋ stages of ⌊√(T/N)⌋ samples, each rounded down to a multiple of N
    # (the stage count drops only if the rounding leaves too few samples).
    stage = max(replicas, int(np.sqrt(budget / replicas)) // replicas * replicas)
    assert abs(schedule.stages - int(np.sqrt(replicas * budget))) <= 1
    assert schedule.sample_budget == schedule.stages * stage
    assert budget - schedule.sample_budget < replicas * schedule.stages + stage
    sizes = schedule.batch_sizes()
    assert all(size % replicas == 0 for size in sizes)
    starts = schedule.stage_starts() + [len(sizes)]
    for begin, end in zip(starts, starts[1:]):
        assert sum(sizes[begin:end]) == stage
        assert sizes[begin] == 8
