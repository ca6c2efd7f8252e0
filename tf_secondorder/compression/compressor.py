"""The interface of gradient compressors, and the name registry.

A compressor turns one replica's float32 tensor into *wire tensors* of
dtypes every collective accepts (float16, bfloat16, float32, int32) and
decodes them back. It is pure tensor maths: no collectives, no state. How the
wires travel between replicas (all-reduce, all-gather, majority vote, the
bidirectional exchange) is an aggregator's business (`tf_secondorder.distribute`).
A compressor of more than one round (PowerSGD) is not a `Compressor`
subclass; `register_multi_round` makes it a valid `compression`.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_secondorder import validation

_REGISTRY = {}


def register(name):
    """Class decorator: `compression=name` builds the class with defaults."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return keras.saving.register_keras_serializable(package="tf_secondorder")(cls)

    return wrap


class Compressor:
    """Base class of one-round compressors. Subclasses define `encode`,
    `decode`, `wire_specs`.

    Class attributes (what an aggregator and `CommunicationConfig` rely on):
        rounds: collectives per step (1: encode, one collective, decode).
        unbiased: E[decode(encode(x))] = x, so error feedback is off by default.
        summable: decode(Σ wires) = Σ decode(wires) (linear codes), so the
            wires may be summed by an all-reduce instead of gathered.
        sign_based: decode gives ±scale per element, so a majority vote of
            the replicas' signs is meaningful.
        carries_magnitude: the decoded values estimate the input's size (not
            true of plain signs), so a gradient norm computed from them means
            something (saddle escape).
        shared_randomness: every replica must draw the same random numbers
            (the seed then leaves out the replica id).
        jit_compatible: encode/decode use only ops with XLA kernels, so they
            can run as fused XLA computations.
    """

    name = None
    unbiased = False
    summable = False
    sign_based = False
    carries_magnitude = True
    shared_randomness = False
    jit_compatible = True
    rounds = 1

    @property
    def aggregations(self):
        """The `aggregation` values this compressor works under: a vote needs
        signs; the bidirectional exchanges have one replica decode another's
        code alone, which shared randomness rules out, and Artemis's memory
        learns the gradient from the decoded values, which plain signs do
        not estimate."""
        accepted = ["mean"]
        if self.sign_based:
            accepted.append("majority_vote")
        if not self.shared_randomness:
            accepted.append("bidirectional")
            if self.carries_magnitude:
                accepted.append("artemis")
        return tuple(accepted)

    @property
    def error_feedback_default(self):
        """Whether error feedback is on when the user leaves it at None."""
        return not self.unbiased

    def variance_bound(self, shape):
        """ω with E‖decode(encode(x)) − x‖² ≤ ω·‖x‖² for every x of `shape`
        (an unbiased compressor's variance factor), or None where no bound
        is declared. Artemis sizes its memory's step by it."""
        return None

    def encode(self, x, seed):
        """Wire tensors for a float32 tensor `x`; `seed`: int64 [2]."""
        raise NotImplementedError

    def decode(self, wire, shape, seed):
        """float32 tensor of `shape` from one replica's (or summed) wires."""
        raise NotImplementedError

    def wire_specs(self, shape):
        """[(shape, dtype)] of the wire tensors for a tensor of `shape`."""
        raise NotImplementedError

    def wire_bytes(self, shape):
        """Exact bytes one replica hands to collectives for a tensor of `shape`."""
        return sum(
            int(np.prod(s, dtype=np.int64)) * tf.as_dtype(d).size
            for s, d in self.wire_specs(tuple(shape))
        )

    def get_config(self):
        """The arguments that rebuild this compressor (Keras serialization)."""
        return {}

    @classmethod
    def from_config(cls, config):
        """The compressor `config` (from `get_config`) describes."""
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def num_elements(shape):
    return int(np.prod(shape, dtype=np.int64))


def get(identifier, name="compression"):
    """A compressor from None, a registered name, a config or an instance."""
    if identifier is None or isinstance(identifier, tuple(_COMPRESSOR_TYPES)):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, str) and identifier in _REGISTRY:
        return _REGISTRY[identifier]()
    validation.fail(
        name,
        f"None, a tfso.compression.Compressor or one of {sorted(_REGISTRY)}",
        identifier,
    )


# Types `get` accepts as they are: `Compressor` and multi-round compressors.
_COMPRESSOR_TYPES = [Compressor]


def register_multi_round(cls):
    """Marks a multi-round compressor (PowerSGD), which is not a
    `Compressor` subclass, as a valid `compression`. It declares `rounds`,
    `aggregations`, `error_feedback_default`, `sign_based`,
    `carries_magnitude`, `wire_specs`, `wire_bytes` and a Keras config, and
    an aggregator registered with `aggregators.serves` does its rounds."""
    _COMPRESSOR_TYPES.append(cls)
    return cls


def names():
    """Names accepted as `compression="..."`, sorted."""
    return sorted(_REGISTRY)


def check_ratio(ratio):
    return validation.number("ratio", ratio, 0.0, 1.0, low_open=True)
