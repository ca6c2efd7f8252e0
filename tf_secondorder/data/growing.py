"""Growing batch sizes: CR-PSGD (SPEC §4.6; Yu & Jin, ICML 2019).

Batch t has ⌊ρ^t · B₁⌋ examples (capped at `max_batch_size`) until the
sample budget T is spent; the last batch takes what is left, so the batches
hold exactly T examples. Each batch is one optimizer step and so one round of
communication: O(log T) rounds instead of T/B at the same samples (under the
PL condition, at the same rate). With `stages=K` the schedule restarts at B₁
K times, each stage spending an equal share of T: the outer rounds of the
Catalyst variant (see `train_step.py`).
"""

import math
import numbers

import numpy as np
import tensorflow as tf


def _positive_int(name, value, minimum=1, optional=False):
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        accepted = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"`{name}` must be {accepted}. Received: {name}={value!r}")
    return int(value)


class GrowingBatchSchedule:
    """Batch sizes ⌊ρ^t · B₁⌋ (capped) until `sample_budget` examples.

    Args:
        initial_batch_size: B₁ >= 1.
        growth_factor: ρ > 1.
        sample_budget: T, the number of examples all batches hold together.
        max_batch_size: cap on a batch (`None`: no cap). Past the cap the
            batch size stays constant and rounds grow linearly again.
        stages: the number of times the schedule restarts at B₁ (Catalyst
            rounds); each stage spends ⌊T / stages⌋ examples, the last one
            the remainder.
        multiple_of: round each size down to a multiple of this (at least
            one multiple); the last batch of a stage keeps the remainder.
            Under N replicas use N: Keras weights every replica's mean loss
            equally, so a batch split unevenly is not the batch mean.
    """

    def __init__(
        self,
        initial_batch_size,
        growth_factor,
        sample_budget,
        max_batch_size=None,
        stages=1,
        multiple_of=1,
    ):
        self.initial_batch_size = _positive_int(
            "initial_batch_size", initial_batch_size
        )
        if (
            isinstance(growth_factor, bool)
            or not isinstance(growth_factor, numbers.Real)
            or not growth_factor > 1
            or math.isinf(growth_factor)
        ):
            raise ValueError(
                "`growth_factor` must be a finite number > 1 (ρ of CR-PSGD). "
                f"Received: growth_factor={growth_factor!r}"
            )
        self.growth_factor = float(growth_factor)
        self.sample_budget = _positive_int("sample_budget", sample_budget)
        self.max_batch_size = _positive_int(
            "max_batch_size", max_batch_size, optional=True
        )
        if (
            self.max_batch_size is not None
            and self.max_batch_size < self.initial_batch_size
        ):
            raise ValueError(
                "`max_batch_size` must be >= `initial_batch_size`. Received: "
                f"max_batch_size={max_batch_size!r}, "
                f"initial_batch_size={initial_batch_size!r}"
            )
        self.stages = _positive_int("stages", stages)
        self.multiple_of = _positive_int("multiple_of", multiple_of)
        if self.stages > self.sample_budget:
            raise ValueError(
                "`stages` must be <= `sample_budget`. Received: "
                f"stages={stages!r}, sample_budget={sample_budget!r}"
            )

    def _stage_sizes(self, budget):
        sizes, spent, t = [], 0, 0
        while spent < budget:
            size = math.floor(self.growth_factor**t * self.initial_batch_size)
            if self.max_batch_size is not None:
                size = min(size, self.max_batch_size)
            size = max(size // self.multiple_of, 1) * self.multiple_of
            size = min(size, budget - spent)
            sizes.append(size)
            spent += size
            t += 1
        return sizes

    def batch_sizes(self):
        """Every batch size, in order; they sum to `sample_budget`."""
        share = self.sample_budget // self.stages
        sizes = []
        for stage in range(self.stages):
            last = stage == self.stages - 1
            budget = self.sample_budget - share * stage if last else share
            sizes += self._stage_sizes(budget)
        return sizes

    def stage_starts(self):
        """Indices of the batches that start a stage (0 first)."""
        share = self.sample_budget // self.stages
        starts, count = [], 0
        for stage in range(self.stages):
            starts.append(count)
            last = stage == self.stages - 1
            budget = self.sample_budget - share * stage if last else share
            count += len(self._stage_sizes(budget))
        return starts

    def __len__(self):
        return len(self.batch_sizes())

    def get_config(self):
        return {
            "initial_batch_size": self.initial_batch_size,
            "growth_factor": self.growth_factor,
            "sample_budget": self.sample_budget,
            "max_batch_size": self.max_batch_size,
            "stages": self.stages,
            "multiple_of": self.multiple_of,
        }


def growing_batches(dataset, schedule):
    """Batches `dataset` (of single examples) by `schedule`, for `model.fit`.

    The examples are taken in order, repeating `dataset` as often as the
    budget needs (shuffle it with `reshuffle_each_iteration=True` first for
    a new order on each pass). The result yields exactly `len(schedule)`
    batches holding `schedule.sample_budget` examples; use it with
    `model.fit(..., epochs=1)`. Under a strategy each global batch is split
    across the replicas.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            "`dataset` must be a tf.data.Dataset of single examples. "
            f"Received: dataset={dataset!r}"
        )
    if not isinstance(schedule, GrowingBatchSchedule):
        raise ValueError(
            "`schedule` must be a tfso.data.GrowingBatchSchedule. "
            f"Received: schedule={schedule!r}"
        )
    sizes = np.asarray(schedule.batch_sizes(), np.int64)
    ends = tf.constant(np.cumsum(sizes), tf.int64)
    size_of = tf.constant(sizes, tf.int64)

    def keyed(index, example):
        batch = tf.searchsorted(ends, [index], side="right")[0]
        return tf.cast(batch, tf.int64), example

    def one_batch(key, window):
        return window.map(lambda _, example: example).batch(tf.gather(size_of, key))

    batches = (
        dataset.repeat()
        .take(schedule.sample_budget)
        .enumerate()
        .map(keyed)
        .group_by_window(
            key_func=lambda key, _: key,
            reduce_func=one_batch,
            window_size_func=lambda key: tf.gather(size_of, key),
        )
    )
    return batches.apply(tf.data.experimental.assert_cardinality(len(sizes)))
