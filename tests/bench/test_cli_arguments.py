"""`tf-secondorder bench` and `launch` arguments: checked before any work,
and `--repeats` with its medians and spreads."""

import json
import math
import sys

import pytest

from tf_secondorder import cli
from tf_secondorder.bench import arguments, report, runner

BAD_BENCH_ARGUMENTS = [
    (["--steps", "0"], "`steps` must be an integer >= 2"),
    (["--steps", "1"], "`steps` must be an integer >= 2"),
    (["--steps=-30"], "`steps` must be an integer >= 2"),
    (["--steps", "30", "--eval-every", "7"], "`eval_every` must be .* between 1 and"),
    (["--steps", "30", "--eval-every", "0"], "`eval_every` must be .* between 1 and"),
    (["--optimizers", ""], "`optimizers` must be a comma-separated list"),
    (["--optimizers", " , "], "`optimizers` must be a comma-separated list"),
    (["--optimizers", "adam,,shampoo"], "`optimizers` must be .* without empty"),
    (["--optimizers", "adam,adam"], "`optimizers` must be distinct names"),
    (["--optimizers", "adagrad"], "`optimizers` must be entries among"),
    (["--lrs", "nan"], "`lrs` must be comma-separated finite numbers > 0"),
    (["--lrs", "1e-3,inf"], "`lrs` must be .*finite.*'inf'"),
    (["--lrs", "0"], "`lrs` must be"),
    (["--lrs=-1e-3"], "`lrs` must be"),
    (["--lrs", "fast"], "`lrs` must be"),
    (["--lrs", ""], "`lrs` must be"),
    (["--lrs", "1e-3,1e-3"], "`lrs` must be distinct"),
    (
        ["--shampoo-option", "precondition_frequncy=50"],
        "`shampoo_option` must be KEY=VALUE with KEY an argument of "
        "tfso.Shampoo.*did you mean 'precondition_frequency'",
    ),
    (["--shampoo-option", "block_size"], "`shampoo_option` must be KEY=VALUE"),
    (["--shampoo-option", "learning_rate=1"], "learning rates come from --lrs"),
    (
        ["--optimizers", "adam", "--shampoo-option", "block_size=64"],
        "`shampoo_option` must be given only when `optimizers` includes shampoo",
    ),
    (["--repeats", "0"], "`repeats` must be an integer >= 1"),
    (["--replicas", "0"], "`replicas` must be an integer >= 1"),
    (["--verbose", "3"], "`verbose` must be 0, 1 or 2"),
    (["--task", "imagenet"], "`task` must be one of"),
    (["--precision", "float16"], "`precision` must be one of"),
    (
        ["--jit-compile", "--replicas", "2"],
        "`jit_compile` must be used with --replicas 1",
    ),
    (["--batch-schedule", "growing:8:0.9"], "`batch_schedule` must be"),
    (["--replicas", "2", "--batch-schedule", "33"], "`batch_schedule` must be"),
    (["--samples", "0"], "`samples` must be an integer >= 1"),
    (["--lrs-of", "muon:1e-3"], "`lrs_of` must be NAME:LR,LR,... with NAME one of"),
    (["--lrs-of", "adam"], "`lrs_of` must be NAME:LR"),
    (["--lrs-of", "adam:0"], "`lrs_of` must be comma-separated finite numbers"),
    (
        ["--lrs-of", "adam:1e-3", "--lrs-of", "adam:3e-3"],
        "`lrs_of` must be one entry per optimizer",
    ),
    (["--average-from", "5000"], r"`average_from` must be a step in \[0, 2000\)"),
    (["--average-from", "-1"], r"`average_from` must be a step in"),
]


@pytest.mark.parametrize("extra, match", BAD_BENCH_ARGUMENTS)
def test_bad_bench_arguments_are_named_before_any_work(no_work, extra, match):
    with pytest.raises(ValueError, match=match):
        cli.main(["bench", *extra])


def test_the_command_exits_2_with_the_message(no_work, capsys):
    assert cli.console(["bench", "--steps", "30", "--lrs", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tf-secondorder: error: `lrs` must be")
    assert "received 'nan'" in err and "Traceback" not in err


def test_out_must_be_a_directory(no_work, tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ValueError, match="`out` must be a directory"):
        cli.main(["bench", "--out", str(path)])


def test_eval_every_defaults_to_a_divisor_of_steps():
    assert arguments.schedule("digits-ae", None, None) == (2000, 50, None)
    assert arguments.schedule("digits-ae", 100, None)[:2] == (100, 50)
    assert arguments.schedule("digits-ae", 30, None)[:2] == (30, 30)
    steps, every, note = arguments.schedule("digits-ae", 120, None)
    assert (steps, every) == (120, 40) and "every 40 steps" in note
    assert arguments.schedule("pydoc-lm", 300, None)[:2] == (300, 100)
    assert arguments.schedule("digits-ae", 120, 60) == (120, 60, None)


def test_a_bad_option_value_fails_before_the_first_run(data_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(runner, "run", refuse)
    with pytest.raises(ValueError, match="`shampoo_option`.*block_size"):
        cli.main(
            [
                "bench",
                "--data-dir",
                data_dir,
                "--optimizers",
                "adam,shampoo",
                "--lrs",
                "1e-3",
                "--steps",
                "4",
                "--shampoo-option",
                "block_size=-3",
            ]
        )


def test_steps_not_a_multiple_of_the_task_interval_trains_exactly_steps(
    data_dir, tmp_path
):
    code = cli.main(
        [
            "bench",
            "--data-dir",
            data_dir,
            "--optimizers",
            "adam",
            "--lrs",
            "1e-3",
            "--steps",
            "6",
            "--verbose",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["steps"] == 6 and report["eval_every"] == 6
    assert [s for s, _ in report["runs"][0]["curve"]] == [6]


def test_repeats_interleave_and_report_median_and_spread(data_dir, tmp_path, capsys):
    code = cli.main(
        [
            "bench",
            "--data-dir",
            data_dir,
            "--optimizers",
            "adam,sgd",
            "--lrs",
            "3e-3",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--repeats",
            "2",
            "--seed",
            "5",
            "--verbose",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "results.json").read_text())
    runs = report["runs"]
    assert [(r["optimizer"], r["repeat"], r["seed"]) for r in runs] == [
        ("adam", 0, 5),
        ("sgd", 0, 5),
        ("adam", 1, 6),
        ("sgd", 1, 6),
    ]
    assert report["repeats"] == 2 and report["seeds"] == [5, 6]
    assert [t["seed"] for t in report["targets"]] == [5, 6]
    # The fields a single run reports are all still there.
    for key in ("task", "target", "baseline", "baseline_lr", "steps", "eval_every"):
        assert key in report
    for r in runs:
        for key in ("steps_ratio", "step_time_ratio", "time_ratio", "final_loss"):
            assert key in r
        assert r["first_step_ratio"] > 0 and r["state_bytes"] > 0
    configurations = {c["optimizer"]: c for c in report["configurations"]}
    assert set(configurations) == {"adam", "sgd"}
    sgd = configurations["sgd"]
    assert sgd["repeats"] == 2
    for key in (
        "steps_ratio",
        "step_time_ratio",
        "time_ratio",
        "first_step_ratio",
        "state_memory_ratio",
    ):
        stats = sgd[key]
        assert len(stats["values"]) == 2
        if stats["median"] is not None:
            assert stats["min"] <= stats["median"] <= (stats["max"] or math.inf)
    # Each repeat's ratios are against that repeat's Adam.
    adam = configurations["adam"]
    assert adam["step_time_ratio"]["values"] == [1.0, 1.0]
    assert adam["first_step_ratio"]["values"] == [1.0, 1.0]
    # Adam keeps two moments per weight, SGD one momentum (plus a few scalars).
    assert 2.0 <= adam["state_memory_ratio"]["median"] < 2.01
    assert 1.0 <= sgd["state_memory_ratio"]["median"] < 1.01
    assert "median [min-max] over 2 repeats" in out
    assert "first-step x" in out and "state/weights" in out


def test_spread_counts_a_run_that_never_reached_the_target_as_slowest():
    stats = report.spread([0.5, None, 0.4], missing_is_infinite=True)
    assert stats["median"] == 0.5 and stats["min"] == 0.4 and stats["max"] is None
    assert report.spread([None, None], missing_is_infinite=True)["median"] is None
    assert report.spread([1.0, None])["median"] == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"command": "python train.py"}, "`command` must be a non-empty list"),
        ({"command": b"python"}, "`command` must be a non-empty list"),
        ({"command": []}, "`command` must be a non-empty list"),
        ({"command": ["python", 3]}, "`command` must be a list of strings"),
        ({"timeout": math.nan}, "`timeout` must be > 0 seconds and finite"),
        ({"timeout": math.inf}, "`timeout` must be > 0 seconds and finite"),
        ({"timeout": "10"}, "`timeout` must be > 0 seconds and finite"),
        ({"timeout": 0}, "`timeout` must be > 0 seconds and finite"),
        ({"workers": math.nan}, "`workers` must be an integer >= 1"),
        ({"workers": math.inf}, "`workers` must be an integer >= 1"),
        ({"max_restarts": math.nan}, "`max_restarts` must be an integer >= 0"),
    ],
)
def test_bad_launch_arguments_are_named(kwargs, match):
    from tf_secondorder.distribute import launch as launcher

    arguments = {"command": [sys.executable, "-c", "raise SystemExit(3)"], **kwargs}
    with pytest.raises(ValueError, match=match):
        launcher.launch(**arguments)


def test_launch_command_with_nan_timeout_exits_2(capsys):
    code = cli.console(
        ["launch", "--timeout", "nan", "--", sys.executable, "-c", "pass"]
    )
    assert code == 2
    assert "`timeout` must be > 0 seconds and finite" in capsys.readouterr().err
