"""tfso.callbacks.BackupAndRestore in one process (multi-worker: test_multi_worker)."""

import json
import os

import keras
import numpy as np
import pytest

import tf_secondorder as tfso
from tests.helpers import mlp, optimizer_state, regression_data, weights_of


def _train(strategy, epochs, backup_dir=None, stop_after_epoch=None, **backup_kwargs):
    x, y = regression_data(n=128)
    with strategy.scope():
        model = mlp()
        model.compile(
            optimizer=tfso.Shampoo(
                learning_rate=1e-2,
                precondition_frequency=3,
                epsilon=1e-4,
                compression="scaled_sign",
            ),
            loss="mse",
        )
    callbacks = []
    if backup_dir is not None:
        callbacks.append(tfso.callbacks.BackupAndRestore(backup_dir, **backup_kwargs))
    if stop_after_epoch is not None:

        class Crash(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == stop_after_epoch:
                    raise KeyboardInterrupt("simulated crash")

        callbacks.append(Crash())
    try:
        model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks)
    except KeyboardInterrupt:
        pass
    return model


def test_resume_after_a_crash_equals_an_uninterrupted_run(mirrored, tmp_path):
    reference = _train(mirrored, epochs=3)
    _train(mirrored, epochs=3, backup_dir=tmp_path, stop_after_epoch=1)
    worker = tmp_path / "worker-0"
    # Only the newest backup is kept.
    assert os.listdir(worker) == ["backup-2"]
    # A process killed while writing backup 3 leaves only a partial
    # directory: it is ignored, by `latest_backup` and by the resumed run.
    (worker / "backup-3.partial").mkdir()
    (worker / "backup-3.partial" / "state.weights.h5").write_bytes(b"truncated")
    callback = tfso.callbacks.BackupAndRestore(tmp_path)
    callback.set_model(mlp())
    assert callback.latest_backup() == str(worker / "backup-2")
    resumed = _train(mirrored, epochs=3, backup_dir=tmp_path)
    # The same ops from the same state on the same devices: bit for bit.
    for got, want in zip(weights_of(resumed), weights_of(reference)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(
        optimizer_state(resumed.optimizer), optimizer_state(reference.optimizer)
    ):
        np.testing.assert_array_equal(got, want)
    # Per-replica error-feedback memories came back per replica.
    memories = [
        v for v in resumed.optimizer.variables if v.path.endswith("_error_feedback")
    ]
    assert memories
    assert not os.path.exists(worker)


def test_integer_save_freq_backs_up_mid_epoch(mirrored, tmp_path):
    _train(
        mirrored, epochs=1, backup_dir=tmp_path, save_freq=3, delete_checkpoint=False
    )
    # 4 batches per epoch: one backup, after the third.
    latest = tmp_path / "worker-0" / "backup-1"
    assert json.loads((latest / "metadata.json").read_text()) == {
        "epoch": 0,
        "batch": 3,
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backup_dir": ""}, "`backup_dir` must be a directory path"),
        ({"backup_dir": "x", "save_freq": 0}, "`save_freq` must be"),
        ({"backup_dir": "x", "save_freq": "batch"}, "`save_freq` must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfso.callbacks.BackupAndRestore(**kwargs)
