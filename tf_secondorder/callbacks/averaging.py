"""Iterate averaging for any Keras optimizer (Polyak–Ruppert, tail averaging)."""

import contextlib
import logging

import keras
import tensorflow as tf

from tf_secondorder import validation

logger = logging.getLogger("tf_secondorder")


class IterateAveraging(keras.callbacks.Callback):
    """Averages the model's trainable weights over the iterates of training.

    From optimizer step `start_step` on, every `every`-th iterate enters a
    uniform running mean:

        w̄ ← w̄ + (w_t − w̄) / n,   n = number of iterates averaged so far

    `start_step=0` averages every iterate (Polyak–Ruppert averaging); a later
    start averages only the tail of training, which is what helps with
    adaptive methods: early iterates are far from the solution and would
    drag the mean back (Granziol et al.'s Gadam averages the tail; SWA, with
    `every` at one epoch's steps, samples it sparsely).

    The mean is what evaluation and export see, while training itself keeps
    following the optimizer's own iterates:

    - `evaluate` (and the validation of `fit`) swaps the mean in and puts
      the current iterate back afterwards (`evaluate_with_average=True`);
    - at the end of `fit` the model holds the mean (`apply_at_end=True`), so
      `model.save`, `model.export` and `predict` use it; a later `fit` with
      this callback resumes from the last iterate, not from the mean, and
      keeps adding to it.

    Works with any optimizer (the update runs after each step, outside it)
    and under a tf.distribute strategy: the mean is a mirrored variable
    assigned in cross-replica context, so every replica holds the same one.
    Under local SGD, where replicas' weights differ between averages, it
    averages the first replica's iterates. Non-trainable weights (such as
    BatchNormalization's moving statistics) are not averaged: the model
    keeps the current ones. The running mean lives in this callback, not in
    the model or optimizer, so a run resumed from a checkpoint starts a new
    mean.

    Args:
        start_step: first optimizer step (`optimizer.iterations` after the
            step) whose iterate is averaged; >= 0.
        every: average every `every`-th iterate from `start_step`; >= 1.
        evaluate_with_average: evaluate with the mean once it holds an
            iterate.
        apply_at_end: leave the mean in the model when `fit` ends.

    Example:

        averaging = tfso.callbacks.IterateAveraging(start_step=1000)
        model.fit(data, epochs=10, callbacks=[averaging])
        model.save("averaged.keras")  # the mean of steps 1000, 1001, ...

    References:
        - Polyak, Juditsky. Acceleration of Stochastic Approximation by
          Averaging. SIAM J. Control Optim. 1992.
        - Izmailov et al. Averaging Weights Leads to Wider Optima and Better
          Generalization. UAI 2018 (SWA).
        - Granziol et al. Iterate Averaging in the Quest for Best Test Error.
          arXiv:2003.01247 (Gadam: Adam with tail averaging).
    """

    def __init__(
        self, start_step=0, every=1, evaluate_with_average=True, apply_at_end=True
    ):
        super().__init__()
        self.start_step = validation.integer("start_step", start_step, 0)
        self.every = validation.integer("every", every, 1)
        self.evaluate_with_average = validation.boolean(
            "evaluate_with_average", evaluate_with_average
        )
        self.apply_at_end = validation.boolean("apply_at_end", apply_at_end)
        self._weights = None  # the model's trainable variables, in order
        self._average = None  # w̄, one variable per weight
        self._current = None  # the iterate while the mean is swapped in
        self._count = None  # iterates in the mean
        self._swapped = False  # the mean is in the model, the iterate in _current
        self._swapped_for_test = False
        self._accumulate = None

    @property
    def count(self):
        """Number of iterates in the mean."""
        return 0 if self._count is None else int(self._count.numpy())

    def averaged_weights(self):
        """The mean of the iterates, as NumPy arrays in the order of
        `model.trainable_variables` (the current weights while it is empty)."""
        if self._average is None:
            return [w.numpy() for w in self.model.trainable_variables]
        return [a.numpy() for a in self._average]

    @contextlib.contextmanager
    def applied(self):
        """Holds the mean in the model inside the `with` block, the current
        iterate again after it (for an evaluation of your own)."""
        if self.count == 0 or self._swapped:
            yield
            return
        self._swap_in()
        try:
            yield
        finally:
            self._swap_out()

    def _build(self):
        model = self.model
        self._weights = list(model.trainable_variables)

        def copies(role):
            return [
                tf.Variable(tf.identity(w), trainable=False, name=f"{role}_{i}")
                for i, w in enumerate(self._weights)
            ]

        # Mirrored under the model's strategy, so every replica holds them.
        with model.distribute_strategy.scope():
            self._average = copies("iterate_average")
            self._current = copies("current_iterate")
            self._count = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._accumulate = tf.function(self._accumulate_fn)

    def _accumulate_fn(self):
        step = tf.cast(self.model.optimizer.iterations, tf.int64)
        due = tf.logical_and(
            step >= self.start_step, (step - self.start_step) % self.every == 0
        )

        def add():
            n = self._count + 1
            for average, w in zip(self._average, self._weights, strict=True):
                # The running mean: exact for a uniform average, one rounding
                # per step instead of a growing sum's.
                fraction = tf.cast(1.0 / tf.cast(n, tf.float64), average.dtype)
                average.assign_add((tf.cast(w, average.dtype) - average) * fraction)
            self._count.assign(n)
            return tf.constant(True)

        return tf.cond(due, add, lambda: tf.constant(False))

    def _swap_in(self):
        for current, average, w in zip(
            self._current, self._average, self._weights, strict=True
        ):
            current.assign(w)
            w.assign(average)
        self._swapped = True

    def _swap_out(self):
        for current, w in zip(self._current, self._weights, strict=True):
            w.assign(current)
        self._swapped = False

    def on_train_begin(self, logs=None):
        if self._average is None:
            self._build()
        elif self._swapped:
            # The previous fit left the mean in the model: train on from its
            # last iterate.
            self._swap_out()

    def on_train_batch_end(self, batch, logs=None):
        self._accumulate()

    def on_test_begin(self, logs=None):
        if self.evaluate_with_average and self.count > 0 and not self._swapped:
            self._swap_in()
            self._swapped_for_test = True

    def on_test_end(self, logs=None):
        if getattr(self, "_swapped_for_test", False):
            self._swap_out()
            self._swapped_for_test = False

    def on_train_end(self, logs=None):
        if self.apply_at_end and self.count > 0 and not self._swapped:
            self._swap_in()
            logger.info(
                "tf_secondorder: IterateAveraging left the mean of %d iterates "
                "in the model",
                self.count,
            )
