"""The bench measures a local-SGD run without changing it: its evaluations
neither add rounds nor make the replicas meet off their schedule."""

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import mlp, regression_data
from tf_secondorder.bench import optimizers, runner, tasks
from tf_secondorder.compat import replica_state

X, Y = regression_data(256)


def _evaluate(model):
    return float(np.mean(np.square(model(X, training=False).numpy() - Y)))


def _task(steps, eval_every):
    def make_dataset(seed):
        data = tf.data.Dataset.from_tensor_slices((X, Y))
        return data.shuffle(256, seed=seed).batch(32, drop_remainder=True).repeat()

    return tasks.Task(
        name="tiny-regression",
        steps=steps,
        eval_every=eval_every,
        batch_size=32,
        make_model=mlp,
        make_dataset=make_dataset,
        evaluate=_evaluate,
        loss="mse",
    )


@pytest.mark.parametrize("name", ["localsgd", "diloco+int8"])
def test_evaluating_often_leaves_the_run_and_its_rounds_unchanged(mirrored, name):
    # 70 steps, averages every 32: rounds at steps 32 and 64 and the one at
    # the end of fit. Evaluating every 10 steps must not add any, nor change
    # a bit of the trajectory (same ops on the same devices).
    often = runner.run(_task(70, 10), name, 1e-2, verbose=0, strategy=mirrored)
    once = runner.run(_task(70, 70), name, 1e-2, verbose=0, strategy=mirrored)
    assert often["rounds"] == once["rounds"] == 3
    assert often["bytes_total"] == once["bytes_total"]
    assert often["curve"][-1][1] == once["curve"][-1][1]
    assert [s for s, _ in often["curve"]] == list(range(10, 71, 10))


def test_evaluation_sees_the_stopped_model_and_puts_every_replica_back(mirrored):
    with mirrored.scope():
        model = mlp()
        optimizer = optimizers.make_optimizer("diloco", 1e-2)
        optimizer.build(model.trainable_variables)
    # A custom loop: no callbacks, so nothing averages off the schedule.
    data = mirrored.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((X, Y)).batch(32).repeat()
    )

    @tf.function
    def step(batch):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        mirrored.run(replica_step, args=batch)

    batches = iter(data)
    for _ in range(40):  # averages at step 32, then 8 local steps
        step(next(batches))
    assert optimizer.replicas_differ()
    variables = [*model.weights, *optimizer.variables]
    before = [replica_state.replica_values(v) for v in variables]
    stats = optimizer.communication_stats()
    assert not np.array_equal(*before[0])  # replica 0 and 1 differ

    loss = runner.evaluate_as_if_stopped(model, optimizer, _evaluate)

    for v, values in zip(variables, before):
        np.testing.assert_array_equal(replica_state.replica_values(v), values, v.path)
    assert optimizer.communication_stats() == stats
    assert optimizer.replicas_differ()
    # What a user gets by stopping here: the outer step, then the weights.
    assert optimizer.average_replicas()
    assert _evaluate(model) == loss
    assert loss != _evaluate_replica_zero(model, before)


def _evaluate_replica_zero(model, before):
    copy = mlp()
    copy.set_weights([values[0] for values in before[: len(model.weights)]])
    return _evaluate(copy)
