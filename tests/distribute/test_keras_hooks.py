"""The private-API hooks must keep being called by Keras.

If a Keras upgrade renames or stops calling
`TFOptimizer._distributed_tf_update_step` or `_all_reduce_sum_gradients`,
these tests fail loudly instead of Shampoo silently never updating its
statistics or compression silently never happening.
"""

import keras
import numpy as np

import tf_secondorder as tfso
from tests.helpers import mlp, regression_data
from tf_secondorder.distribute import _keras_hooks


def test_keras_still_has_the_hooked_method():
    assert _keras_hooks.keras_has_hook_points(), (
        "keras.optimizers.Optimizer no longer has the hooked methods; "
        "update tf_secondorder/distribute/_keras_hooks.py for this Keras version"
    )


def _fit(model, opt, **kwargs):
    x, y = regression_data()
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, **kwargs)


def test_hook_is_called_by_model_fit():
    before = _keras_hooks.HOOK_CALLS["update"]
    opt = tfso.Shampoo(precondition_frequency=2)
    _fit(mlp(), opt)
    assert _keras_hooks.HOOK_CALLS["update"] > before
    stats = [v for v in opt.variables if "statistics" in v.path]
    assert stats and all(np.abs(s.numpy()).sum() > 0 for s in stats)


def test_hook_is_called_under_mirrored_strategy(mirrored):
    before = _keras_hooks.HOOK_CALLS["update"]
    with mirrored.scope():
        model = mlp()
        opt = tfso.Shampoo(precondition_frequency=2)
    _fit(model, opt)
    assert _keras_hooks.HOOK_CALLS["update"] > before
    assert int(opt.iterations.numpy()) == 4


def test_hook_is_called_through_loss_scale_optimizer():
    before = _keras_hooks.HOOK_CALLS["update"]
    opt = keras.optimizers.LossScaleOptimizer(tfso.Shampoo(precondition_frequency=2))
    _fit(mlp(), opt)
    assert _keras_hooks.HOOK_CALLS["update"] > before


def test_reduce_hook_is_called_by_fit_under_mirrored_strategy(mirrored):
    """Keras must still sum gradients through `_all_reduce_sum_gradients`.

    If it stops, compression would silently stop: every replica would send
    uncompressed float32 and the byte counter would stay at zero.
    """
    before = _keras_hooks.HOOK_CALLS["reduce"]
    with mirrored.scope():
        model = mlp()
        opt = tfso.distributed(keras.optimizers.SGD(0.1), compression="sign")
    _fit(model, opt)
    assert _keras_hooks.HOOK_CALLS["reduce"] > before
    stats = opt.communication_stats()
    assert stats["rounds"] == 4 and stats["bytes_per_step"] > 0


def test_reduce_hook_is_called_through_loss_scale_optimizer(mirrored):
    before = _keras_hooks.HOOK_CALLS["reduce"]
    with mirrored.scope():
        model = mlp()
        inner = tfso.Shampoo(compression="fp16")
        opt = keras.optimizers.LossScaleOptimizer(inner)
    _fit(model, opt)
    assert _keras_hooks.HOOK_CALLS["reduce"] > before
    assert inner.communication_stats()["rounds"] == 4


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


def test_multi_worker_fix_is_installed_while_keras_has_the_bugs():
    needed = _keras_hooks.multi_worker_fixes_needed()
    trainer = _keras_hooks._trainer_module()
    # Whatever this Keras needs is patched; what it does not need is Keras's own.
    assert ("symbolic_build" in _keras_hooks._ORIGINALS) == needed["symbolic_build"]
    assert ("reduce_per_replica" in _keras_hooks._ORIGINALS) == needed[
        "reduce_per_replica"
    ]
    if needed["reduce_per_replica"]:
        assert trainer.reduce_per_replica.__module__ == _keras_hooks.__name__
    if keras.__version__.startswith("3.15."):
        # Measured on 3.15.1 (SPEC §5): both bugs are there.
        assert needed == {"symbolic_build": True, "reduce_per_replica": True}


def test_bug_probes_tell_buggy_from_fixed_source():
    trainer = _keras_hooks._trainer_module()
    buggy_build = _keras_hooks._source(_keras_hooks._ORIGINALS["symbolic_build"])
    buggy_reduce = _keras_hooks._source(_keras_hooks._ORIGINALS["reduce_per_replica"])
    assert _keras_hooks.symbolic_build_has_bug(buggy_build)
    assert _keras_hooks.reduce_per_replica_has_bug(buggy_reduce)
    assert not _keras_hooks.symbolic_build_has_bug(_FIXED_SYMBOLIC_BUILD)
    assert not _keras_hooks.reduce_per_replica_has_bug(_FIXED_REDUCE)
    assert not _keras_hooks.symbolic_build_has_bug(None)
    assert trainer is not None


def test_fix_switches_itself_off_on_a_fixed_keras(monkeypatch):
    trainer = _keras_hooks._trainer_module()
    _keras_hooks.uninstall_multi_worker_fit_fix()
    try:
        own_build = trainer.TensorFlowTrainer._maybe_symbolic_build
        own_reduce = trainer.reduce_per_replica
        monkeypatch.setattr(
            _keras_hooks,
            "_source",
            lambda f: (
                _FIXED_REDUCE
                if f.__name__ == "reduce_per_replica"
                else _FIXED_SYMBOLIC_BUILD
            ),
        )
        assert _keras_hooks.install_multi_worker_fit_fix() == []
        assert trainer.TensorFlowTrainer._maybe_symbolic_build is own_build
        assert trainer.reduce_per_replica is own_reduce
    finally:
        monkeypatch.undo()
        _keras_hooks.install_multi_worker_fit_fix()
    assert _keras_hooks.install_multi_worker_fit_fix() == [
        "symbolic_build",
        "reduce_per_replica",
    ] or not any(_keras_hooks.multi_worker_fixes_needed().values())


def test_fix_leaves_single_worker_strategies_to_keras(mirrored):
    before = dict(_keras_hooks.HOOK_CALLS)
    with mirrored.scope():
        model = mlp()
        opt = tfso.distributed(keras.optimizers.Adam(1e-2))
    _fit(model, opt)
    for key in ("multi_worker_build", "multi_worker_reduce"):
        assert _keras_hooks.HOOK_CALLS[key] == before.get(key, 0)
    assert not _keras_hooks.in_multi_worker_mode(mirrored)
    assert _keras_hooks.worker_index(mirrored) == 0
