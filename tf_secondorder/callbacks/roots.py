"""Drives pipelined root refreshes from `fit`."""

import keras


class RootPipeline(keras.callbacks.Callback):
    """Between the steps of `fit`, lets a Shampoo / SOAP optimizer with
    pipelined refreshes start its host computation of the roots after a
    refresh step and wait for late roots before the call that installs them
    (`advance_root_pipeline`).

    `fit` adds it automatically when the model's optimizer pipelines its
    refreshes; passing it explicitly is harmless.
    """

    def _optimizer(self):
        optimizer = getattr(self.model, "optimizer", None)
        return getattr(optimizer, "inner_optimizer", optimizer)

    def on_train_begin(self, logs=None):
        # Built here, before Keras traces the train step, the optimizer
        # creates no variables inside that trace (which makes TensorFlow
        # trace it twice), and its step is traced knowing that this
        # callback drives the pipeline.
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            with self.model.distribute_strategy.scope():
                optimizer.build(self.model.trainable_variables)
        self._advance(resync=True)
        # The driver counts steps in Python between its reads of the step
        # counter; a callback may restore a checkpoint in its own
        # `on_train_begin` (BackupAndRestore), before or after this one, so
        # the first batch reads the counter afresh.
        self._first_batch = True

    def on_train_batch_begin(self, batch, logs=None):
        self._advance(resync=getattr(self, "_first_batch", False))
        self._first_batch = False

    def _advance(self, resync=False):
        optimizer = self._optimizer()
        if hasattr(optimizer, "advance_root_pipeline"):
            steps = getattr(self.model, "steps_per_execution", 1) or 1
            optimizer.advance_root_pipeline(int(steps), resync=resync)


def pipelines_roots(optimizer):
    """Whether `optimizer` refreshes its roots off the training step."""
    return bool(getattr(optimizer, "refresh_delay_steps", 0))
