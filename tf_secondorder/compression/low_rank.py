"""PowerSGD's low-rank maths (Vogels, Karimireddy, Jaggi 2019).

PowerSGD is a multi-round compressor: its two factors are computed from sums
over replicas, so it needs two rounds of communication in between (its
aggregator is `tf_secondorder.distribute.aggregators.PowerSGDMean`). This
module holds its options and the pure tensor functions of each round.
"""

import numpy as np
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compression.compressor import (
    num_elements,
    register,
    register_multi_round,
)


@register_multi_round
@register("powersgd")
class PowerSGD:
    """Rank-r PowerSGD. Biased: error feedback is on by default.

    A tensor is viewed as a matrix M [∏shape[:-1], shape[-1]]. With Q from
    the previous step (warm start): P = M·Q, all-reduce P, orthonormalise P
    (QR), Q = Mᵀ·P, all-reduce Q; the mean is P·Qᵀ/N and this replica's own
    part, for error feedback, P·Q_iᵀ. 1-D tensors, and matrices for which
    r(m + n) ≥ m·n, are sent uncompressed in the first round.

    Args:
        rank: r, an integer >= 1. Defaults to 4.
        seed: seed of the first Q (the same on every replica).
    """

    unbiased = False
    error_feedback_default = True
    sign_based = False
    carries_magnitude = True
    # Two all-reduces a step, each of a sum the next one needs: only its own
    # aggregator (`PowerSGDMean`) can run it, and only as a mean.
    rounds = 2
    aggregations = ("mean",)

    def __init__(self, rank=4, seed=0):
        self.rank = validation.integer("rank", rank, 1)
        self.seed = validation.seed("seed", seed)

    def plan(self, shape):
        """(rows, cols, rank), or None when the tensor is sent uncompressed."""
        if len(shape) < 2:
            return None
        rows, cols = num_elements(shape[:-1]), int(shape[-1])
        rank = min(self.rank, rows, cols)
        if rank * (rows + cols) >= rows * cols:
            return None
        return rows, cols, rank

    def initial_factor(self, shape, index):
        """The first Q [cols, rank] of tensor number `index`, or None."""
        plan = self.plan(tuple(shape))
        if plan is None:
            return None
        rng = np.random.default_rng([self.seed, index])
        return rng.standard_normal((plan[1], plan[2])).astype(np.float32)

    def wire_specs(self, shape):
        """[(shape, dtype)] handed to the two all-reduces for `shape`."""
        plan = self.plan(tuple(shape))
        if plan is None:
            return [(tuple(shape), tf.float32)]
        rows, cols, rank = plan
        return [((rows, rank), tf.float32), ((cols, rank), tf.float32)]

    def wire_bytes(self, shape):
        """Exact bytes one replica hands to collectives for a tensor of `shape`:
        both rounds' factors, P [rows, rank] and Q [cols, rank], in float32."""
        return sum(
            int(np.prod(s, dtype=np.int64)) * tf.as_dtype(d).size
            for s, d in self.wire_specs(shape)
        )

    def get_config(self):
        """The arguments that rebuild this compressor: `rank` and `seed`."""
        return {"rank": self.rank, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        """The compressor `config` (from `get_config`) describes."""
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), self.rank, self.seed))

    def __repr__(self):
        return f"PowerSGD(rank={self.rank}, seed={self.seed})"


def left_factor(matrix, q):
    """P = M·Q (summed over replicas next)."""
    return matrix @ q


def orthonormal(p):
    """An orthonormal basis of P's columns (QR)."""
    return tf.linalg.qr(p)[0]


def right_factor(matrix, basis):
    """Q = Mᵀ·P̂ (summed over replicas next)."""
    return tf.transpose(matrix) @ basis


def reconstruct(basis, q, shape):
    """P̂·Qᵀ in the tensor's shape."""
    return tf.reshape(basis @ tf.transpose(q), shape)
