"""A Keras callback that puts communication statistics in the training logs."""

import keras


class CommunicationStats(keras.callbacks.Callback):
    """Adds `comm_bytes_per_step`, `comm_rounds` and `comm_bytes_total` to the logs.

    Works with any optimizer that has `communication_stats()` (every
    tf_secondorder optimizer and `tfso.distributed(...)`); the numbers are per
    replica. Per-batch logs get them when `every_batch=True`; the epoch logs
    (and so `History`) always do.
    """

    def __init__(self, every_batch=False):
        super().__init__()
        self.every_batch = every_batch

    def _stats(self):
        optimizer = getattr(self.model, "optimizer", None)
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if not hasattr(optimizer, "communication_stats"):
            raise ValueError(
                "CommunicationStats needs a tf_secondorder optimizer or "
                f"tfso.distributed(...); the model's optimizer is {optimizer!r}"
            )
        return optimizer.communication_stats()

    def _add(self, logs):
        if logs is None:
            return
        stats = self._stats()
        logs["comm_bytes_per_step"] = stats["bytes_per_step"]
        logs["comm_rounds"] = stats["rounds"]
        logs["comm_bytes_total"] = stats["bytes_total"]

    def on_train_batch_end(self, batch, logs=None):
        if self.every_batch:
            self._add(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._add(logs)
