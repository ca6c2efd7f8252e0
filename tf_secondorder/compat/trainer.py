"""What tf_secondorder reads from Keras models, optimizers and strategies
through private attributes."""

import keras
import tensorflow as tf

from tf_secondorder.compat import testing


def optimizer_strategy(optimizer):
    """The tf.distribute strategy the optimizer was created under."""
    return optimizer._distribution_strategy


def optimizer_trainable_variables(optimizer):
    """The model variables the optimizer was built for, in `build`'s order."""
    return optimizer._trainable_variables


def learning_rate_argument(optimizer):
    """What was passed as `learning_rate`: a schedule or callable as such
    (so it need not be registered to be copied), else None."""
    value = getattr(optimizer, "_learning_rate", None)
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule) or (
        callable(value) and not isinstance(value, keras.Variable)
    ):
        return value
    return None


def in_multi_worker_mode(strategy):
    """True for a MultiWorkerMirroredStrategy with more than one worker."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def worker_index(strategy):
    """This process's task index under a multi-worker strategy, else 0."""
    if not in_multi_worker_mode(strategy):
        return 0
    return int(strategy.cluster_resolver.task_id or 0)


def compute_training_loss(model, x, y, y_pred, sample_weight):
    """What Keras's TensorFlow `train_step` computes as the loss (compiled
    losses, the model's own losses, pre-scaled by 1/replicas)."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def track_training_loss(model, loss, count):
    """Adds `loss` of `count` examples to the "loss" `fit` logs, as Keras does."""
    from keras.src.losses import loss as loss_module

    testing.record("loss_tracker")
    model._loss_tracker.update_state(
        loss_module.unscale_loss_for_distribution(loss), sample_weight=count
    )


def set_initial_epoch(model, epoch):
    """Makes the next `fit` start at `epoch` (what Keras's BackupAndRestore does)."""
    model._initial_epoch = int(epoch)
