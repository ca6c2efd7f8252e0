"""What each name of `tf-secondorder bench --optimizers` builds: the
optimizer at a learning rate, with the run's options ("+COMPRESSOR" compression,
"#LABEL" variants, `--option` keyword arguments)."""

import dataclasses
import re

import keras

import tf_secondorder as tfso
from tf_secondorder import validation
from tf_secondorder.compat import trainer


def communication_keys():
    """The fields of tfso.distribute.CommunicationConfig: every optimizer of
    the bench accepts them (Keras ones through `tfso.distributed`)."""
    from tf_secondorder.distribute.config import CommunicationConfig

    return {f.name for f in dataclasses.fields(CommunicationConfig)}


# Every optimizer runs with its library defaults: what a user's
# `tfso.Shampoo(learning_rate=...)` does. Options for one run come from the
# command line (`--option`, see bench/options.py) and are recorded with it.
KERAS_OPTIMIZERS = {
    "adam": lambda lr, **o: keras.optimizers.Adam(lr, **o),
    "adamw": lambda lr, **o: keras.optimizers.AdamW(lr, **o),
    "sgd": lambda lr, **o: keras.optimizers.SGD(lr, **{"momentum": 0.9, **o}),
    "lion": lambda lr, **o: keras.optimizers.Lion(lr, **o),
    "muon": lambda lr, **o: keras.optimizers.Muon(lr, **o),
}

# Keys of `--option diloco:KEY=VALUE` and `--option localsgd:KEY=VALUE` that
# are the bench's own rather than the inner optimizer's or the communication
# options, with what they set.
BENCH_KEYS = {
    "diloco": {
        "outer_learning_rate": "the outer Nesterov SGD's learning rate (0.8)",
        "outer_momentum": "its momentum (0.3; 0: plain SGD)",
        "average_optimizer_state": "false: average the weights only (true)",
    },
    "localsgd": {
        "average_optimizer_state": "false: average the weights only (true)",
    },
}


def _communication_split(options):
    """(the inner optimizer's options, the communication options)."""
    keys = communication_keys()
    inner = {k: v for k, v in options.items() if k not in keys}
    return inner, {k: v for k, v in options.items() if k in keys}


def _merge(name, communication, given):
    """`communication` (from "+COMPRESSOR") and `given` (options), disjoint."""
    twice = sorted(set(communication) & set(given))
    if twice:
        raise TypeError(
            f"{name}: {twice[0]!r} is set both by the name's '+' and by an option"
        )
    return {**communication, **given}


def _averaged(optimizer, average_optimizer_state):
    """`optimizer`, averaging the weights only when `average_optimizer_state`
    is false (local SGD's measured alternative)."""
    if not validation.boolean("average_optimizer_state", average_optimizer_state):
        optimizer.averaged_variables = lambda: list(
            trainer.optimizer_trainable_variables(optimizer)
        )
    return optimizer


def _diloco(
    lr,
    compression=None,
    outer_learning_rate=0.8,
    outer_momentum=0.3,
    average_optimizer_state=True,
    **options,
):
    """DiLoCo: AdamW inside, 32 local steps, an outer Nesterov SGD with lr
    0.8 and momentum 0.3; "+COMPRESSOR" compresses the pseudo-gradients. With
    one replica it is AdamW. The paper's outer step (lr 0.7, momentum 0.9)
    overshot at 32 local steps on 2 replicas: 1.39x synchronous Adam's final
    loss on digits-ae and 1.16x on pydoc-lm, against 0.97x and 0.92x with
    this one (`--option diloco:outer_learning_rate=0.7 --option
    diloco:outer_momentum=0.9`)."""
    inner, given = _communication_split(options)
    # JSON reads "0" as an int, which Keras's SGD rejects as a momentum.
    momentum = float(outer_momentum)
    outer = keras.optimizers.SGD(
        float(outer_learning_rate), momentum=momentum, nesterov=momentum > 0
    )
    communication = {"average_every": 32, "outer_optimizer": outer}
    communication.update(
        _merge("diloco", {"average_compression": compression}, given)
        if compression is not None
        else given
    )
    optimizer = tfso.distributed(keras.optimizers.AdamW(lr, **inner), **communication)
    return _averaged(optimizer, average_optimizer_state)


def _local_sgd(lr, compression=None, average_optimizer_state=True, **options):
    """Local SGD: Adam inside, the replicas' weights (and, unless
    `average_optimizer_state` is false, optimizer state) averaged every 32
    steps (no outer optimizer); "+COMPRESSOR" compresses the averaged change."""
    inner, given = _communication_split(options)
    communication = {"average_every": 32}
    communication.update(
        _merge("localsgd", {"average_compression": compression}, given)
        if compression is not None
        else given
    )
    optimizer = tfso.distributed(keras.optimizers.Adam(lr, **inner), **communication)
    return _averaged(optimizer, average_optimizer_state)


TFSO_OPTIMIZERS = {
    "shampoo": lambda lr, **o: tfso.Shampoo(lr, **o),
    "soap": lambda lr, **o: tfso.SOAP(lr, **o),
    "signsgd": lambda lr, **o: tfso.SignSGD(lr, **{"momentum": 0.9, **o}),
    "onebitadam": lambda lr, **o: tfso.OneBitAdam(lr, **o),
    "compams": lambda lr, **o: tfso.CompAMS(lr, **o),
    "diloco": _diloco,
    "localsgd": _local_sgd,
}


def optimizer_class(base):
    """The class whose arguments `--option BASE:KEY=VALUE` may set (for
    diloco and localsgd: the inner optimizer's)."""
    return {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": keras.optimizers.SGD,
        "lion": keras.optimizers.Lion,
        "muon": keras.optimizers.Muon,
        "shampoo": tfso.Shampoo,
        "soap": tfso.SOAP,
        "signsgd": tfso.SignSGD,
        "onebitadam": tfso.OneBitAdam,
        "compams": tfso.CompAMS,
        "diloco": keras.optimizers.AdamW,
        "localsgd": keras.optimizers.Adam,
    }[base]


def optimizer_names():
    """Every accepted name; any of them may end in "+COMPRESSOR" and then
    "#LABEL"."""
    return sorted(KERAS_OPTIMIZERS) + sorted(TFSO_OPTIMIZERS)


def parse_name(name):
    """ "shampoo+sign" -> ("shampoo", {"compression": "sign"}), checked. A
    "#LABEL" at the end (letters, digits, "_", "-", ".") only tells
    configurations of one optimizer apart: "localsgd#8" is localsgd."""
    label, hash_sign, tag = name.partition("#")
    if hash_sign and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        validation.fail(
            "optimizers",
            "entries whose label after '#' is letters, digits, '_', '-' or '.'",
            name,
        )
    base, _, compression = label.partition("+")
    if base not in KERAS_OPTIMIZERS and base not in TFSO_OPTIMIZERS:
        validation.fail(
            "optimizers",
            f"entries among {optimizer_names()}, each optionally followed by "
            "+COMPRESSOR (e.g. shampoo+sign) and #LABEL (e.g. localsgd#8)",
            name,
        )
    if not compression:
        return base, {}
    if compression not in tfso.compression.names():
        validation.fail(
            "optimizers",
            f"entries whose compressor after '+' is one of {tfso.compression.names()}",
            name,
        )
    return base, {"compression": compression}


def make_optimizer(name, learning_rate, options=None, wrap=False):
    """The optimizer `name` (see `parse_name`) with `options` (its keyword
    arguments, the communication options among them); Keras optimizers go
    through `tfso.distributed` when compressed, given communication options,
    or when `wrap` (to count bytes)."""
    base, communication = parse_name(name)
    options = dict(options or {})
    if base in TFSO_OPTIMIZERS:
        return TFSO_OPTIMIZERS[base](
            learning_rate, **_merge(name, communication, options)
        )
    inner, given = _communication_split(options)
    communication = _merge(name, communication, given)
    optimizer = KERAS_OPTIMIZERS[base](learning_rate, **inner)
    if communication or wrap:
        optimizer = tfso.distributed(optimizer, **communication)
    return optimizer
