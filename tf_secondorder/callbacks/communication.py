"""The optimizer's counters in the training logs (so in History, CSVLogger
and TensorBoard)."""

import keras


def _optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    return getattr(optimizer, "inner_optimizer", optimizer)


def counters(optimizer):
    """{log name: number} of a tf_secondorder optimizer's counters."""
    stats = optimizer.communication_stats()
    out = {
        "nonfinite_steps": int(optimizer.nonfinite_steps.numpy()),
        "comm_bytes_per_step": stats["bytes_per_step"],
        "comm_rounds": stats["rounds"],
        "comm_bytes_total": stats["bytes_total"],
    }
    for name in ("root_failures", "refreshes", "refresh_seconds", "refresh_waits"):
        variable = getattr(optimizer, name, None)
        if variable is not None:
            out[name] = variable.numpy().item()
    return out


class OptimizerCounters(keras.callbacks.Callback):
    """Adds the optimizer's counters to the logs of every epoch (and of
    every batch with `every_batch=True`): `nonfinite_steps`,
    `comm_bytes_per_step`, `comm_rounds`, `comm_bytes_total` (per replica),
    and for Shampoo and SOAP `root_failures`, `refreshes`,
    `refresh_seconds` (the wall time spent computing refreshes so far) and
    `refresh_waits` (pipelined refreshes whose roots were late).

    `fit` gets it automatically (first among the callbacks, so TensorBoard
    and CSVLogger see the counters) for every tf_secondorder optimizer and
    `tfso.distributed(...)`; passing it explicitly is harmless.
    """

    def __init__(self, every_batch=False):
        super().__init__()
        self.every_batch = every_batch

    def _add(self, logs):
        if logs is None:
            return
        optimizer = _optimizer(self.model)
        if not hasattr(optimizer, "communication_stats"):
            raise ValueError(
                f"{type(self).__name__} needs a tf_secondorder optimizer or "
                f"tfso.distributed(...); the model's optimizer is {optimizer!r}"
            )
        if optimizer.built:
            logs.update(counters(optimizer))

    def on_train_batch_end(self, batch, logs=None):
        if self.every_batch:
            self._add(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._add(logs)


class CommunicationStats(OptimizerCounters):
    """The name of `OptimizerCounters` before 0.2 (it logged only the
    `comm_*` counters)."""
