"""The communication options of every tf_secondorder optimizer, checked once."""

import dataclasses

import keras
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compression import compressor as compressors
from tf_secondorder.distribute import saddle
from tf_secondorder.distribute.artemis import default_memory_rate

AGGREGATIONS = ("mean", "majority_vote", "bidirectional", "artemis")


@dataclasses.dataclass(frozen=True)
class CommunicationConfig:
    """What the replicas of a data-parallel strategy send each other.

    Every tf_secondorder optimizer and `tfso.distributed(...)` accept these
    as keyword arguments. With one replica (no strategy) none of them sends
    anything and training is unchanged.

    Attributes:
        compression: `None`, a name from `tfso.compression.names()`, or a
            `tfso.compression` instance (`Compressor` or `PowerSGD`): the
            compressor each replica's gradient is encoded with.
        error_feedback: `None` (on for biased compressors, and for the
            bidirectional exchange), `True` or `False`: each replica adds
            what its compressor dropped before to what it sends next.
        aggregation: `"mean"`; `"majority_vote"` (sign compressors: the
            update is the sign of the replicas' summed signs); or
            `"bidirectional"` (the mean is compressed again on its way back,
            with worker and server memories: O(d) bytes per replica at any
            replica count); or `"artemis"` (the same exchange, with Artemis's
            worker memory that learns each replica's gradient instead of
            error feedback; `memory_rate`, `participation`).
        average_every: `None`, or I >= 1 for local SGD: replicas step on
            their own gradients and average weights and optimizer state
            every I steps (one collective per I steps).
        average_warmup_steps: synchronous steps before local SGD starts.
        saddle_escape: `None` or a `tfso.SaddleEscape`: a random perturbation
            when the gradient norm stays small (leaves strict saddles).
        compression_warmup_steps: steps at the start whose gradients are
            all-reduced in full precision; compression (and its memories)
            starts after them. The compressed exchange runs during them too
            (a graph is static), so they cost float32 bytes plus the
            compressed ones.
        full_precision_every: `None`, or K >= 1: after the warm-up, every
            K-th step is also all-reduced in full precision (needs
            `compression_warmup_steps`).
        outer_optimizer: with `average_every`, a Keras optimizer (instance,
            name or config) applied to the replicas' mean pseudo-gradient,
            the weights' change since the last average (DiLoCo); `None`:
            plain averaging.
        average_compression: with `average_every`, a one-round compressor
            (name or instance, e.g. `"fp16"`, `"int8"`) for the
            pseudo-gradients, with a per-replica error-feedback memory of
            its own.
        memory_rate: with `aggregation="artemis"`, α in (0, 1], the step of
            the memories h_i ← h_i + α·C(g_i − h_i). `None`: 1/(2(ω + 1))
            for an unbiased compressor of variance factor ω (the paper's
            choice), 1 for a biased one (`distribute/artemis.py`).
        participation: with `aggregation="artemis"`, p in (0, 1]: each
            replica takes part in a step with probability p (drawn alike on
            every replica); the others contribute their memory.
    """

    compression: object = None
    error_feedback: object = None
    aggregation: str = "mean"
    average_every: object = None
    average_warmup_steps: int = 0
    saddle_escape: object = None
    compression_warmup_steps: int = 0
    full_precision_every: object = None
    outer_optimizer: object = None
    average_compression: object = None
    memory_rate: object = None
    participation: float = 1.0

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        set_("compression", compressors.get(self.compression))
        set_(
            "error_feedback",
            validation.boolean("error_feedback", self.error_feedback, optional=True),
        )
        set_(
            "aggregation",
            validation.choice("aggregation", self.aggregation, AGGREGATIONS),
        )
        set_(
            "average_every",
            validation.integer("average_every", self.average_every, 1, optional=True),
        )
        set_(
            "average_warmup_steps",
            validation.integer("average_warmup_steps", self.average_warmup_steps, 0),
        )
        set_("saddle_escape", saddle.get(self.saddle_escape))
        set_("outer_optimizer", _outer_optimizer(self.outer_optimizer))
        set_(
            "average_compression",
            compressors.get(self.average_compression, "average_compression"),
        )
        set_(
            "full_precision_every",
            validation.integer(
                "full_precision_every", self.full_precision_every, 1, optional=True
            ),
        )
        set_(
            "compression_warmup_steps",
            validation.integer(
                "compression_warmup_steps", self.compression_warmup_steps, 0
            ),
        )
        set_(
            "memory_rate",
            validation.number(
                "memory_rate", self.memory_rate, 0.0, 1.0, low_open=True, optional=True
            ),
        )
        set_(
            "participation",
            validation.number(
                "participation", self.participation, 0.0, 1.0, low_open=True
            ),
        )
        self._check_combinations()

    def _check_combinations(self):
        compression = self.compression
        if self.error_feedback is True and compression is None:
            validation.fail(
                "error_feedback", "None or False when `compression` is None", True
            )
        accepted = () if compression is None else compression.aggregations
        if self.aggregation == "majority_vote" and "majority_vote" not in accepted:
            validation.fail(
                "aggregation",
                "'mean' or 'bidirectional' unless `compression` is a sign "
                f"compressor ('sign', 'scaled_sign'); compression is {compression!r}",
                self.aggregation,
            )
        if self.aggregation == "bidirectional" and "bidirectional" not in accepted:
            validation.fail(
                "aggregation",
                "'mean' or 'majority_vote' unless `compression` is a compressor whose "
                "code one replica can decode alone (not None, 'powersgd' or "
                f"'randomk'); compression is {compression!r}",
                self.aggregation,
            )
        if self.aggregation == "artemis":
            self._check_artemis()
        else:
            for name, default in (("memory_rate", None), ("participation", 1.0)):
                if getattr(self, name) != default:
                    validation.fail(
                        name,
                        f"{default} unless `aggregation` is 'artemis'",
                        getattr(self, name),
                    )
        if self.compression_warmup_steps and compression is None:
            validation.fail(
                "compression_warmup_steps",
                "0 when `compression` is None",
                self.compression_warmup_steps,
            )
        if self.full_precision_every is not None and not self.compression_warmup_steps:
            validation.fail(
                "full_precision_every",
                "None unless `compression_warmup_steps` is set",
                self.full_precision_every,
            )
        if self.average_every is None:
            for name in ("outer_optimizer", "average_compression"):
                if getattr(self, name) is not None:
                    validation.fail(
                        name, "None unless `average_every` is set", getattr(self, name)
                    )
        average_compression = self.average_compression
        if getattr(average_compression, "rounds", 1) != 1:
            validation.fail(
                "average_compression",
                f"a one-round compressor ({type(average_compression).__name__} "
                f"needs {average_compression.rounds} rounds of every step)",
                average_compression,
            )
        if self.average_every is None and self.average_warmup_steps:
            validation.fail(
                "average_warmup_steps",
                "0 unless `average_every` (local SGD) is set",
                self.average_warmup_steps,
            )
        if self.average_every is not None and compression is not None:
            validation.fail(
                "compression",
                "None under local SGD (`average_every` averages weights, it "
                f"sends no gradients; average_every={self.average_every})",
                compression,
            )
        if self.saddle_escape is not None and self.average_every is not None:
            validation.fail(
                "saddle_escape",
                "None under local SGD (it perturbs the common weights of "
                f"synchronous training; average_every={self.average_every})",
                self.saddle_escape,
            )
        if self.saddle_escape is not None and (
            self.aggregation == "majority_vote"
            or not getattr(compression, "carries_magnitude", True)
        ):
            validation.fail(
                "saddle_escape",
                "None when the reduced gradient has no magnitude (majority vote "
                f"or plain signs: its norm is always √d); compression is "
                f"{compression!r}, aggregation is {self.aggregation!r}",
                self.saddle_escape,
            )

    def _check_artemis(self):
        compression = self.compression
        if "artemis" not in (() if compression is None else compression.aggregations):
            validation.fail(
                "aggregation",
                "'mean' (or 'bidirectional') unless `compression` is a compressor "
                "whose code one replica can decode alone and whose values carry "
                "magnitudes (not None, 'sign', 'powersgd' or 'randomk'); "
                f"compression is {compression!r}",
                self.aggregation,
            )
        if self.error_feedback:
            validation.fail(
                "error_feedback",
                "None or False with aggregation='artemis' (its memory learns "
                "the gradient; error feedback is the 'bidirectional' mode)",
                self.error_feedback,
            )
        if self.memory_rate is None and default_memory_rate(compression, (1,)) is None:
            validation.fail(
                "memory_rate",
                f"a number in (0, 1] for {compression!r}, which declares no "
                "variance bound to size the default by",
                None,
            )

    @property
    def uses_error_feedback(self):
        """Resolved `error_feedback`. Under majority vote the default is off:
        the vote is Bernstein et al.'s algorithm, which has no memory."""
        if self.compression is None:
            return False
        if self.error_feedback is not None:
            return self.error_feedback
        if self.aggregation == "artemis":
            return False
        if self.aggregation == "bidirectional":
            return True
        return self.aggregation == "mean" and self.compression.error_feedback_default

    def full_precision_step(self, step):
        """Whether 1-based `step` (int32 tensor) is all-reduced in full
        precision (the compression warm-up and every K-th step after it)."""
        warmup = self.compression_warmup_steps
        due = step <= warmup
        if self.full_precision_every is not None:
            due |= tf.equal((step - warmup) % self.full_precision_every, 0)
        return due

    @property
    def local_sgd(self):
        """Whether replicas train on their own between averages (`average_every`
        set: local SGD or DiLoCo)."""
        return self.average_every is not None

    def get_config(self):
        """Serializable options; a compressor with its defaults as its name."""
        return {
            "compression": _name_or_config(self.compression),
            "error_feedback": self.error_feedback,
            "aggregation": self.aggregation,
            "average_every": self.average_every,
            "average_warmup_steps": self.average_warmup_steps,
            "saddle_escape": (
                None if self.saddle_escape is None else self.saddle_escape.get_config()
            ),
            "compression_warmup_steps": self.compression_warmup_steps,
            "full_precision_every": self.full_precision_every,
            "outer_optimizer": (
                None
                if self.outer_optimizer is None
                else keras.optimizers.serialize(self.outer_optimizer)
            ),
            "average_compression": _name_or_config(self.average_compression),
            "memory_rate": self.memory_rate,
            "participation": self.participation,
        }

    @classmethod
    def pop_from(cls, kwargs, constraints=(), when_compressed=None, **defaults):
        """The config made of the options in `kwargs` (removed from it), the
        given `defaults` standing in for the options not there.

        `constraints` (`Constraint`s an optimizer declares) are checked
        first. `when_compressed`: options the optimizer sets itself when
        something is compressed (OneBitAdam's stages), over any given. A
        default `compression_warmup_steps` applies only when something is
        compressed (an optimizer that warms up its compression by default
        still accepts `compression=None`)."""
        names = [f.name for f in dataclasses.fields(cls)]
        given = {name: kwargs.pop(name) for name in names if name in kwargs}
        options = {**defaults, **given}
        for constraint in constraints:
            constraint.check(options)
        if options.get("compression") is None:
            if "compression_warmup_steps" not in given:
                options.pop("compression_warmup_steps", None)
        elif when_compressed:
            options.update(when_compressed)
        return cls(**options)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A communication option an optimizer cannot work with, declared by the
    optimizer and checked once by `CommunicationConfig.pop_from`.

    When `option` is set (neither None nor 0), a ValueError names
    `argument`, the optimizer's own argument that rules the option out (or
    the option itself), and says it must be `accepted`.
    """

    option: str
    argument: str
    accepted: str
    value: object = None

    def check(self, options):
        given = options.get(self.option)
        if given is None or (isinstance(given, (int, float)) and given == 0):
            return
        value = given if self.argument == self.option else self.value
        validation.fail(self.argument, self.accepted, value)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(CommunicationConfig))


def _name_or_config(compression):
    """A compressor with its defaults as its name, else its Keras config."""
    if compression is None:
        return None
    name = getattr(type(compression), "name", None)
    if name is not None and compression == type(compression)():
        return name
    return keras.saving.serialize_keras_object(compression)


def _outer_optimizer(identifier):
    if identifier is None:
        return None
    if isinstance(identifier, (str, dict)):
        identifier = keras.optimizers.get(identifier)
    from tf_secondorder.compat.optimizer_step import KerasStepHooks

    if (
        not isinstance(identifier, keras.optimizers.Optimizer)
        or isinstance(identifier, KerasStepHooks)
        or identifier.built
    ):
        validation.fail(
            "outer_optimizer",
            "None or an unbuilt plain Keras optimizer (instance, name or config)",
            identifier,
        )
    return identifier
