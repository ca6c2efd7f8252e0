"""A train step for large growing batches: micro-batches and Catalyst.

`train_in_micro_batches(model, micro_batch_size)` replaces `model.train_step`
(the instance's, for `fit`) with one that splits each replica's batch into
micro-batches of at most `micro_batch_size` examples, sums their gradients
locally (a `tf.while_loop`: one micro-batch's activations alive at a time)
and applies them once. The optimizer, and so the all-reduce, runs once per
batch: a CR-PSGD batch of 10⁵ examples costs one round and the memory of
one micro-batch. The loss of a batch is the example-weighted mean of its
micro-batches' losses, so gradients equal the full-batch ones (up to float
rounding) for models without batch-coupled layers (BatchNormalization sees
micro-batch statistics).

`catalyst_theta=θ > 0` with a `schedule` gives the Catalyst variant for
non-convex problems: each stage k of the schedule minimises
f(x) + θ/2‖x − y_{k−1}‖², with the anchor y set to the weights at the first
step of every stage. The anchor lives with the train step, not the model:
after a resume in the middle of a stage it restarts at the resumed weights.
The logged loss is f alone.
"""

import keras
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compat.trainer import (
    compute_training_loss,
    track_training_loss,
)
from tf_secondorder.data.growing import GrowingBatchSchedule


def train_in_micro_batches(
    model, micro_batch_size=None, catalyst_theta=0.0, schedule=None
):
    """Installs the micro-batched (and optionally Catalyst) train step on `model`.

    Args:
        model: a compiled or uncompiled `keras.Model`.
        micro_batch_size: examples per micro-batch on each replica; `None`
            trains each batch at once.
        catalyst_theta: θ >= 0, the proximal weight; 0 turns Catalyst off.
        schedule: the `GrowingBatchSchedule` of the data; needed when θ > 0
            (its stages say when the anchor restarts).

    Returns:
        `model`.
    """
    if not isinstance(model, keras.Model):
        validation.fail("model", "a keras.Model", model)
    micro_batch_size = validation.integer(
        "micro_batch_size", micro_batch_size, 1, optional=True
    )
    catalyst_theta = validation.number("catalyst_theta", catalyst_theta, 0.0)
    if catalyst_theta > 0 and not isinstance(schedule, GrowingBatchSchedule):
        validation.fail(
            "schedule",
            "the data's tfso.data.GrowingBatchSchedule when `catalyst_theta` > 0 "
            "(its stages say when the anchor restarts)",
            schedule,
        )
    if catalyst_theta > 0 and not model.built:
        validation.fail(
            "model",
            "a built model when `catalyst_theta` > 0 (its anchor copies the "
            "weights): build it, e.g. with keras.Input, before this call",
            model,
        )
    step = _MicroBatchStep(model, micro_batch_size, float(catalyst_theta), schedule)
    if catalyst_theta > 0:
        step.make_anchors()
    model.train_step = step
    model.make_train_function(force=True)
    return model


class _MicroBatchStep:
    def __init__(self, model, micro_batch_size, theta, schedule):
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.theta = theta
        self.stage_starts = schedule.stage_starts() if schedule is not None else [0]
        self.anchors = None

    def make_anchors(self):
        # Sync-on-read: each replica anchors its own weights without a
        # collective (under local SGD they differ).
        with self.model.distribute_strategy.scope():
            self.anchors = [
                tf.Variable(
                    tf.zeros(v.shape, v.dtype),
                    trainable=False,
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                )
                for v in self.model.trainable_variables
            ]
            self.anchored = tf.Variable(
                False,
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def __call__(self, data):
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = model.trainable_variables
        count = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
        if self.micro_batch_size is None:
            gradients = self._gradients(x, y, sample_weight, 1.0)
        else:
            size = self.micro_batch_size
            chunks = (count + size - 1) // size

            def body(k, total):
                start = k * size
                end = tf.minimum(start + size, count)
                part = [_rows(t, start, end) for t in (x, y, sample_weight)]
                weight = tf.cast(end - start, tf.float32) / tf.cast(count, tf.float32)
                grads = self._gradients(*part, weight)
                return k + 1, [a + tf.cast(g, a.dtype) for a, g in zip(total, grads)]

            zeros = [tf.zeros(v.shape, v.dtype) for v in variables]
            _, gradients = tf.while_loop(
                lambda k, _: k < chunks, body, (tf.constant(0), zeros)
            )
        if self.theta > 0:
            gradients = self._add_proximal(gradients)
        model.optimizer.apply_gradients(zip(gradients, variables))
        return model.get_metrics_result()

    def _gradients(self, x, y, sample_weight, weight):
        model = self.model
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = compute_training_loss(model, x, y, y_pred, sample_weight)
            count = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
            track_training_loss(model, loss, count)
            scaled = model.optimizer.scale_loss(loss * tf.cast(weight, loss.dtype))
        model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        grads = tape.gradient(scaled, model.trainable_variables)
        return [
            tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, model.trainable_variables)
        ]

    def _add_proximal(self, gradients):
        model = self.model
        variables = model.trainable_variables
        step = tf.cast(model.optimizer.iterations, tf.int64)
        starts = tf.constant(self.stage_starts, tf.int64)
        restart = tf.reduce_any(tf.equal(step, starts)) | ~self.anchored.read_value()

        def anchor():
            for a, v in zip(self.anchors, variables):
                a.assign(tf.convert_to_tensor(v))
            self.anchored.assign(True)
            return tf.constant(True)

        with tf.control_dependencies([tf.cond(restart, anchor, lambda: restart)]):
            replicas = tf.distribute.get_replica_context().num_replicas_in_sync
            # θ(x − y), pre-scaled like the loss (1/N, loss scale): the
            # cross-replica sum gives the full proximal gradient once.
            factor = model.optimizer.scale_loss(tf.constant(self.theta / replicas))
            return [
                g
                + tf.cast(factor, g.dtype) * (tf.convert_to_tensor(v) - a.read_value())
                for g, v, a in zip(gradients, variables, self.anchors)
            ]


def _rows(structure, start, end):
    if structure is None:
        return None
    return tf.nest.map_structure(lambda t: t[start:end], structure)
