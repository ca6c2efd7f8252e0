"""`tf-secondorder bench --option OPTIMIZER:KEY=VALUE`: parsed and checked
before any work, and passed to the optimizer it names."""

import pytest

from tests.helpers import mlp
from tf_secondorder import cli
from tf_secondorder.bench import optimizers, options, runner
from tf_secondorder.bench.usage import UsageError

BAD_OPTIONS = [
    (["--option", "compams"], "`option` must be OPTIMIZER:KEY=VALUE"),
    (["--option", "compams:beta_1"], "`option` must be OPTIMIZER:KEY=VALUE"),
    (["--option", ":beta_1=0.9"], "`option` must be OPTIMIZER:KEY=VALUE"),
    (
        ["--option", "adagrad:beta_1=0.9"],
        r"`option` must be OPTIMIZER:KEY=VALUE with OPTIMIZER one of "
        r"\['adam', 'compams\+topk'\] or \['compams'\].*'adagrad' is unknown",
    ),
    (["--option", "shampoo:block_size=64"], "'shampoo' is not in `optimizers`"),
    (
        ["--option", "compams:compression_warmup_step=0"],
        "`option` must be KEY=VALUE with KEY an argument of compams: .*"
        "did you mean 'compression_warmup_steps'",
    ),
    (["--option", "adam:learning_rate=1"], "learning rates come from --lrs"),
    # The bench's DiLoCo keys belong to diloco only.
    (["--option", "adam:outer_momentum=0.5"], "`option` must be KEY=VALUE"),
    (
        ["--batch-schedule", "16,32", "--option", "adam:amsgrad=true"],
        "`option` must be left out with `batch_schedule`",
    ),
    (
        ["--shampoo-option", "block_size=64"],
        "`shampoo_option` must be given only when `optimizers` includes shampoo",
    ),
]


@pytest.mark.parametrize("extra, match", BAD_OPTIONS)
def test_bad_options_are_named_before_any_work(no_work, extra, match):
    argv = ["bench", "--optimizers", "adam,compams+topk", "--steps", "4", *extra]
    with pytest.raises(UsageError, match=match):
        cli.main(argv)


def test_values_are_json_and_the_full_name_wins_over_the_base():
    names = ["compams", "compams+topk", "shampoo"]
    parsed, sources = options.parse(
        [
            "compams:compression_warmup_steps=0",
            "compams:beta2=0.99",
            "compams+topk:beta2=0.9",
            'compams+topk:compression={"name": "qsgd"}',
        ],
        ["grafting=sgd", "block_size=64"],
        names,
    )
    assert options.for_run("compams", parsed) == {
        "compression_warmup_steps": 0,
        "beta2": 0.99,
    }
    assert options.for_run("compams+topk", parsed) == {
        "compression_warmup_steps": 0,
        "beta2": 0.9,
        "compression": {"name": "qsgd"},
    }
    assert options.for_run("shampoo", parsed) == {"grafting": "sgd", "block_size": 64}
    assert sources == {
        "shampoo": "shampoo_option",
        "compams": "option",
        "compams+topk": "option",
    }


def test_labels_run_one_optimizer_with_several_settings():
    names = ["adam", "localsgd#8", "localsgd+int8#8", "localsgd#weights"]
    parsed, _ = options.parse(
        [
            "localsgd:average_every=4",
            "localsgd#8:average_every=8",
            "localsgd+int8:average_every=16",
            "localsgd+int8#8:average_warmup_steps=2",
            "localsgd#weights:average_optimizer_state=false",
        ],
        None,
        names,
    )
    assert options.for_run("adam", parsed) == {}
    assert options.for_run("localsgd#8", parsed) == {"average_every": 8}
    assert options.for_run("localsgd+int8#8", parsed) == {
        "average_every": 16,
        "average_warmup_steps": 2,
    }
    assert options.for_run("localsgd#weights", parsed) == {
        "average_every": 4,
        "average_optimizer_state": False,
    }
    assert options.scopes("localsgd+int8#8") == [
        "localsgd",
        "localsgd+int8",
        "localsgd+int8#8",
    ]
    assert optimizers.make_optimizer("localsgd#8", 1e-3, {"average_every": 8})
    for bad in ("localsgd#", "localsgd#a:b", "adagrad#x"):
        with pytest.raises(ValueError, match="`optimizers` must be entries"):
            optimizers.parse_name(bad)


def test_every_optimizer_takes_its_arguments_and_the_communication_options():
    for name in optimizers.optimizer_names():
        accepted = set(options.accepted_keys(name))
        assert {"average_every", "compression", "clipnorm"} <= accepted, name
        assert "learning_rate" not in accepted
    assert {"precondition_frequency", "grafting"} <= set(options.shampoo_arguments())
    assert "amsgrad" in options.accepted_keys("adam")
    assert {"outer_learning_rate", "outer_momentum", "weight_decay"} <= set(
        options.accepted_keys("diloco")
    )
    assert "average_optimizer_state" in options.accepted_keys("localsgd")


def test_options_reach_the_optimizer(mirrored):
    adam = optimizers.make_optimizer(
        "adam", 1e-3, {"amsgrad": True, "average_every": 8}
    )
    assert adam.amsgrad and adam.communication.average_every == 8
    diloco = optimizers.make_optimizer(
        "diloco+int8",
        1e-3,
        {"average_every": 4, "outer_learning_rate": 0.7, "outer_momentum": 0.9},
    )
    plain = optimizers.make_optimizer(
        "diloco", 1e-3, {"outer_learning_rate": 1, "outer_momentum": 0}
    )
    outer = diloco.communication.outer_optimizer
    assert diloco.communication.average_every == 4
    assert float(outer.learning_rate) == pytest.approx(0.7)
    assert outer.momentum == pytest.approx(0.9) and outer.nesterov
    assert type(diloco.communication.average_compression).__name__ == "Int8"
    # JSON integers are numbers too; no momentum: plain SGD.
    plain_outer = plain.communication.outer_optimizer
    assert plain_outer.momentum == 0.0 and not plain_outer.nesterov
    for state, expected in ((True, 3), (False, 1)):
        # Adam keeps two slots per weight: weights + slots, or the weights only.
        with mirrored.scope():
            model = mlp()
            local = optimizers.make_optimizer(
                "localsgd", 1e-3, {"average_optimizer_state": state}
            )
            local.build(model.trainable_variables)
        weights = len(model.trainable_variables)
        assert len(local.averaged_variables()) == expected * weights


@pytest.mark.parametrize(
    "names, option, match",
    [
        ("adam+sign", "adam+sign:compression=int8", r"`option`: adam\+sign .*set both"),
        ("adam,localsgd#x", "localsgd#x:average_every=0", "`option`: localsgd#x .*"),
        ("shampoo#a", "shampoo:block_size=-3", "`option`: shampoo#a .*block_size"),
    ],
)
def test_a_bad_option_value_is_rejected_before_the_first_run(
    data_dir, no_run, names, option, match
):
    with pytest.raises(UsageError, match=match):
        cli.main(
            ["bench", "--data-dir", data_dir, "--optimizers", names]
            + ["--lrs", "1e-3", "--steps", "4", "--option", option]
        )


@pytest.fixture
def no_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(runner, "run", refuse)
