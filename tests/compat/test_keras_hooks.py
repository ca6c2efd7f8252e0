"""The private-API hooks must keep being called by Keras.

If a Keras upgrade renames or stops calling a hooked method of its
TensorFlow optimizer, these tests fail loudly instead of Shampoo silently
never updating its statistics or compression silently never happening.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import mlp, regression_data
from tf_secondorder.compat import keras_patches, optimizer_step, testing, trainer


def test_keras_still_has_the_hooked_methods():
    assert optimizer_step.keras_has_hook_points(), (
        "Keras's TFOptimizer no longer has the hooked methods; update "
        "tf_secondorder/compat/optimizer_step.py for this Keras version"
    )


def _fit(model, opt, **kwargs):
    x, y = regression_data()
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, **kwargs)


def test_hooks_are_called_by_model_fit():
    opt = tfso.Shampoo(precondition_frequency=2, weight_decay=0.01)
    with testing.count_hook_calls() as calls:
        _fit(mlp(), opt)
    assert calls["update"] > 0 and calls["reduce"] > 0 and calls["weight_decay"] > 0
    stats = [v for v in opt.variables if "statistics" in v.path]
    assert stats and all(np.abs(s.numpy()).sum() > 0 for s in stats)


def test_counting_is_off_outside_the_switch():
    before = testing.hook_calls()
    _fit(mlp(), tfso.Shampoo(precondition_frequency=2))
    assert testing.hook_calls() == before


def test_hook_is_called_under_mirrored_strategy(mirrored):
    with mirrored.scope():
        model = mlp()
        opt = tfso.Shampoo(precondition_frequency=2)
    with testing.count_hook_calls() as calls:
        _fit(model, opt)
    assert calls["update"] > 0
    assert int(opt.iterations.numpy()) == 4


def test_hook_is_called_through_loss_scale_optimizer():
    opt = keras.optimizers.LossScaleOptimizer(tfso.Shampoo(precondition_frequency=2))
    with testing.count_hook_calls() as calls:
        _fit(mlp(), opt)
    assert calls["update"] > 0


def test_reduce_hook_is_called_by_fit_under_mirrored_strategy(mirrored):
    """Keras must still sum gradients through `_all_reduce_sum_gradients`.

    If it stops, compression would silently stop: every replica would send
    uncompressed float32 and the byte counter would stay at zero.
    """
    with mirrored.scope():
        model = mlp()
        opt = tfso.distributed(keras.optimizers.SGD(0.1), compression="sign")
    with testing.count_hook_calls() as calls:
        _fit(model, opt)
    assert calls["reduce"] > 0
    stats = opt.communication_stats()
    assert stats["rounds"] == 4 and stats["bytes_per_step"] > 0


def test_reduce_hook_is_called_through_loss_scale_optimizer(mirrored):
    with mirrored.scope():
        model = mlp()
        inner = tfso.Shampoo(compression="fp16")
        opt = keras.optimizers.LossScaleOptimizer(inner)
    with testing.count_hook_calls() as calls:
        _fit(model, opt)
    assert calls["reduce"] > 0
    assert inner.communication_stats()["rounds"] == 4


@pytest.mark.parametrize("name", ["AdamW", "Muon"])
def test_deferred_weight_decay_is_keras_own(name):
    """Weight decay moves into the step; it must equal Keras's own, including
    an optimizer class's own rule (Muon's)."""
    results = []
    x, y = regression_data()
    for wrap in (False, True):
        model = mlp()
        make = getattr(keras.optimizers, name)
        opt = make(learning_rate=0.01, weight_decay=0.1)
        if wrap:
            opt = tfso.distributed(opt)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
        results.append([w.numpy() for w in model.weights])
    for ours, keras_own in zip(results[1], results[0]):
        # Same ops in the same order on one device: equal bits.
        np.testing.assert_array_equal(ours, keras_own)


# --- the MultiWorkerMirroredStrategy fit workaround (keras-team/keras#20585) ---

_FIXED_SYMBOLIC_BUILD = """
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = self.distribute_strategy.experimental_local_results(batch)[0]
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)
"""
_FIXED_REDUCE = """
        if _collective_all_reduce_multi_worker(strategy):
            if reduction == "mean":
                return strategy.reduce("MEAN", v, axis=None)
"""


def test_nothing_is_patched_at_import():
    import subprocess
    import sys

    code = (
        "import tf_secondorder, keras\n"
        "from keras.src.backend.tensorflow import trainer\n"
        "from tf_secondorder.compat import installed_keras_patches\n"
        "assert installed_keras_patches() == [], installed_keras_patches()\n"
        "assert trainer.reduce_per_replica.__module__.startswith('keras')\n"
        "assert keras.callbacks.CallbackList.__init__.__module__.startswith('keras')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_this_keras_has_both_bugs_and_the_probes_tell_them_apart():
    needed = keras_patches.multi_worker_fixes_needed()
    if keras.__version__.startswith("3.15."):
        # Measured on 3.15.1: both bugs are there.
        assert needed == {"symbolic_build": True, "reduce_per_replica": True}
    assert not keras_patches.symbolic_build_has_bug(_FIXED_SYMBOLIC_BUILD)
    assert not keras_patches.reduce_per_replica_has_bug(_FIXED_REDUCE)


def test_fix_installs_logs_once_and_uninstalls(caplog):
    from keras.src.backend.tensorflow import trainer as keras_trainer

    own_build = keras_trainer.TensorFlowTrainer._maybe_symbolic_build
    own_reduce = keras_trainer.reduce_per_replica
    try:
        with caplog.at_level("WARNING", logger="tf_secondorder"):
            assert keras_patches.install_multi_worker_fit_fix() == [
                "symbolic_build",
                "reduce_per_replica",
            ]
            assert keras_patches.install_multi_worker_fit_fix() == []
        assert len([r for r in caplog.records if "patched" in r.message]) == 2
        assert keras_trainer.reduce_per_replica is not own_reduce
    finally:
        keras_patches.uninstall_keras_patches(["symbolic_build", "reduce_per_replica"])
    assert keras_trainer.TensorFlowTrainer._maybe_symbolic_build is own_build
    assert keras_trainer.reduce_per_replica is own_reduce


def test_fix_switches_itself_off_on_a_fixed_keras(monkeypatch):
    monkeypatch.setattr(
        keras_patches,
        "read_source",
        lambda f: (
            _FIXED_REDUCE
            if f.__name__ == "reduce_per_replica"
            else _FIXED_SYMBOLIC_BUILD
        ),
    )
    assert keras_patches.install_multi_worker_fit_fix() == []
    # (Other tests in this process may have installed the local-SGD patch.)
    assert not {"symbolic_build", "reduce_per_replica"} & set(
        keras_patches.installed_keras_patches()
    )


def test_unreadable_keras_source_fails_loudly(monkeypatch):
    import inspect

    def no_source(function):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    with pytest.raises(keras_patches.KerasSourceUnavailable, match="force=True"):
        keras_patches.install_multi_worker_fit_fix()
    # (Other tests in this process may have installed the local-SGD patch.)
    assert not {"symbolic_build", "reduce_per_replica"} & set(
        keras_patches.installed_keras_patches()
    )


def test_fix_leaves_single_worker_strategies_to_keras(mirrored):
    with mirrored.scope():
        model = mlp()
        opt = tfso.distributed(keras.optimizers.Adam(1e-2))
    with testing.count_hook_calls() as calls:
        _fit(model, opt)
    assert calls["multi_worker_build"] == calls["multi_worker_reduce"] == 0
    assert not {"symbolic_build", "reduce_per_replica"} & set(
        keras_patches.installed_keras_patches()
    )
    assert not trainer.in_multi_worker_mode(mirrored)
    assert trainer.worker_index(mirrored) == 0
    assert tf.distribute.has_strategy() is False
