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
