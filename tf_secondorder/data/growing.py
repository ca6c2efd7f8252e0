"""Growing batch sizes: CR-PSGD (Yu & Jin, ICML 2019).

Batch t has ⌊ρ^t · B₁⌋ examples (capped at `max_batch_size`) until the
sample budget T is spent; the last batch takes what is left, so the batches
hold exactly T examples. Each batch is one optimizer step and so one round of
communication: O(log T) rounds instead of T/B at the same samples (under the
PL condition, at the same rate). With `stages=K` the schedule restarts at B₁
K times, each stage spending an equal share of T: the outer rounds of the
Catalyst variant (see `train_step.py`).
"""

import math

import numpy as np
import tensorflow as tf

from tf_secondorder import validation


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
        self.initial_batch_size = validation.integer(
            "initial_batch_size", initial_batch_size, 1
        )
        self.growth_factor = validation.number(
            "growth_factor", growth_factor, 1.0, low_open=True
        )
        self.sample_budget = validation.integer("sample_budget", sample_budget, 1)
        self.max_batch_size = validation.integer(
            "max_batch_size", max_batch_size, self.initial_batch_size, optional=True
        )
        self.stages = validation.integer("stages", stages, 1, self.sample_budget)
        self.multiple_of = validation.integer("multiple_of", multiple_of, 1)

    @classmethod
    def catalyst(
        cls,
        initial_batch_size,
        growth_factor,
        sample_budget,
        replicas=1,
        max_batch_size=None,
    ):
        """The schedule of CR-PSGD-Catalyst (Yu & Jin 2019, Algorithm 2) with
        the paper's split of T samples over N replicas: ⌊√(N·T)⌋ stages of
        ⌊√(T/N)⌋ samples each (rounded down to a multiple of N, so every
        batch size is one; T loses less than N samples per stage), each a growing
        schedule from B₁.

        Its rounds, about √(N·T)·log_ρ(√(T/N)(ρ − 1)/B₁), are fewer than a
        fixed batch B's T/B only for T beyond roughly N·B²·log²; below that
        choose `stages` yourself.
        """
        sample_budget = validation.integer("sample_budget", sample_budget, 1)
        replicas = validation.integer("replicas", replicas, 1)
        stages = max(1, math.isqrt(replicas * sample_budget))
        # Every stage a multiple of N samples, so that every batch is (the
        # last of a stage holds what is left of it); T rounds down to fit.
        share = max(replicas, sample_budget // stages // replicas * replicas)
        stages = min(stages, max(1, sample_budget // share))
        return cls(
            initial_batch_size,
            growth_factor,
            stages * share,
            max_batch_size=max_batch_size,
            stages=stages,
            multiple_of=replicas,
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
        """The arguments that rebuild this schedule."""
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
        validation.fail("dataset", "a tf.data.Dataset of single examples", dataset)
    if not isinstance(schedule, GrowingBatchSchedule):
        validation.fail("schedule", "a tfso.data.GrowingBatchSchedule", schedule)
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
