"""Replica sync for local SGD: averaged weights wherever Keras reads them."""

import numbers

import keras

from tf_secondorder import validation


def _optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    return getattr(optimizer, "inner_optimizer", optimizer)


def _averages(model):
    communication = getattr(_optimizer(model), "communication", None)
    return bool(getattr(communication, "local_sgd", False))


class SyncReplicas(keras.callbacks.Callback):
    """Averages the replicas' weights before anything outside training reads them.

    With `average_every` (local SGD) the replicas' weights differ between
    averages, and Keras reads replica 0's copy outside a train step. This
    callback averages (one collective, only when local steps ran since the
    last average) before evaluation and prediction, at the end of each epoch
    (before checkpoints and backups: it runs first), every `save_every`
    batches for batch-frequency checkpoints, and at the end of `fit`.

    `fit`, `evaluate` and `predict` add it automatically when the model's
    optimizer averages; passing it explicitly is harmless.

    Args:
        save_every: batch frequencies (ints) at which other callbacks save.
    """

    def __init__(self, save_every=()):
        super().__init__()
        if isinstance(save_every, (str, bytes)) or not hasattr(save_every, "__iter__"):
            validation.fail("save_every", "a sequence of integers >= 1", save_every)
        self.save_every = tuple(
            validation.integer("save_every", f, 1) for f in save_every
        )
        self._batches = 0

    def _sync(self):
        optimizer = _optimizer(self.model)
        if hasattr(optimizer, "average_replicas"):
            optimizer.average_replicas()

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if any(self._batches % f == 0 for f in self.save_every):
            self._sync()

    def on_epoch_end(self, epoch, logs=None):
        self._sync()

    def on_train_end(self, logs=None):
        self._sync()

    def on_test_begin(self, logs=None):
        self._sync()

    def on_predict_begin(self, logs=None):
        self._sync()


def automatic_callbacks(model, callbacks):
    """The callbacks every fit/evaluate/predict of `model` gets (installed by
    `compat.keras_patches.install_callback_injection`): the optimizer's
    counters in the logs, the host side of pipelined root refreshes, and
    under local SGD the replicas' sync."""
    from tf_secondorder.callbacks.communication import OptimizerCounters
    from tf_secondorder.callbacks.roots import RootPipeline, pipelines_roots

    extra = []
    if pipelines_roots(_optimizer(model)) and not any(
        isinstance(c, RootPipeline) for c in callbacks
    ):
        extra.append(RootPipeline())
    if hasattr(_optimizer(model), "communication_stats") and not any(
        isinstance(c, OptimizerCounters) for c in callbacks
    ):
        extra.append(OptimizerCounters())
    if not _averages(model) or any(isinstance(c, SyncReplicas) for c in callbacks):
        return extra
    frequencies = [
        c.save_freq
        for c in callbacks
        if isinstance(getattr(c, "save_freq", None), numbers.Integral)
        and not isinstance(c.save_freq, bool)
        and c.save_freq > 0
    ]
    # The sync first: checkpoints and the counters then see the average.
    return [SyncReplicas(save_every=frequencies)] + extra
