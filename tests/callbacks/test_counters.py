"""Optimizer counters in the fit logs: History, CSVLogger and TensorBoard
see them without extra code."""

import csv
import glob
import os

import keras
import numpy as np
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import mlp, regression_data


def _scalars(log_dir):
    """{tag: [values]} from the TensorBoard event files under `log_dir`."""
    out = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if array.dtype.kind != "f":  # the model graph, text summaries
                    continue
                out.setdefault(value.tag, []).append(float(array))
    return out


def test_shampoo_counters_reach_tensorboard_csv_and_history(tmp_path):
    x, y = regression_data()
    model = mlp()
    optimizer = tfso.Shampoo(0.01, precondition_frequency=2)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        verbose=0,
        callbacks=[
            keras.callbacks.TensorBoard(str(tmp_path / "tb")),
            keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        ],
    )
    # 8 steps, refreshes at steps 2, 4, 6, 8.
    assert history.history["refreshes"] == [2, 4]
    assert history.history["root_failures"] == [0, 0]
    assert history.history["nonfinite_steps"] == [0, 0]
    assert history.history["refresh_seconds"][-1] > 0
    # Wall time differs per run and worker: it stays out of the saved state.
    names = [v.path for v in optimizer.variables]
    assert any("refreshes" in n for n in names)
    assert not any("refresh_seconds" in n for n in names), names
    scalars = _scalars(str(tmp_path / "tb"))
    for name in ("refreshes", "refresh_seconds", "root_failures", "nonfinite_steps"):
        assert f"epoch_{name}" in scalars, sorted(scalars)
    assert scalars["epoch_refreshes"] == [2.0, 4.0]
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["refreshes"]) for r in rows] == [2.0, 4.0]
    assert "comm_rounds" in rows[0]


def test_distributed_counters_count_bytes_and_skips(mirrored):
    x, y = regression_data()
    with mirrored.scope():
        model = mlp()
        optimizer = tfso.distributed(keras.optimizers.SGD(0.01), compression="int8")
        model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert history.history["comm_rounds"] == [4]
    assert 0 < history.history["comm_bytes_per_step"][0]
    assert history.history["nonfinite_steps"] == [0]
    assert "refreshes" not in history.history


def test_plain_keras_optimizers_get_no_counters():
    x, y = regression_data(32)
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, epochs=1, verbose=0)
    assert set(history.history) == {"loss"}
    assert np.isfinite(history.history["loss"][0])


def test_refresh_seconds_time_the_refresh_in_the_step():
    """In the step the clock brackets the roots' computation: its
    timestamps are ordered around it, not left free to run side by side
    (unordered, they measured about 2 µs for all four refreshes; ordered,
    several ms on this machine: the bound sits far from both)."""
    x, y = regression_data()
    model = mlp()
    optimizer = tfso.Shampoo(0.01, precondition_frequency=2, root_refresh="in_step")
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert int(optimizer.refreshes.numpy()) == 4
    assert float(optimizer.refresh_seconds.numpy()) > 5e-5
