"""`tf-secondorder multiworker`: its arguments, checked before any worker
starts, and its summary of a worker's record."""

import pytest

from tests.helpers import run_cli_in_subprocess
from tf_secondorder import cli
from tf_secondorder.bench import multiworker
from tf_secondorder.bench.usage import UsageError


def test_help_runs():
    out = run_cli_in_subprocess(["multiworker", "--help"], timeout=120).stdout
    assert "--rates" in out and "--settings" in out and "time-to-target" in out


@pytest.mark.parametrize(
    "args, name",
    [
        (["--workers", "0"], "workers"),
        (["--workers", "2,x"], "workers"),
        (["--rates", "1gb"], "rates"),
        (["--short-rates", "fast"], "short_rates"),
        (["--settings", "fp32,zip"], "settings"),
        (["--steps", "0"], "steps"),
        (["--learning-rate", "nan"], "learning_rate"),
        (["--max-seconds", "0"], "max_seconds"),
    ],
)
def test_bad_arguments_are_named_before_any_worker(monkeypatch, args, name):
    def refuse(*args, **kwargs):
        raise AssertionError("workers started before the arguments were checked")

    monkeypatch.setattr(multiworker, "driver", refuse)
    with pytest.raises(UsageError, match=f"`{name}` must be"):
        cli.main(["multiworker", *args])


def test_out_must_be_a_file(monkeypatch, tmp_path):
    monkeypatch.setattr(multiworker, "driver", lambda args: 0)
    with pytest.raises(UsageError, match="`out` must be a file path"):
        cli.main(["multiworker", "--out", str(tmp_path)])


def test_summary_of_a_record():
    # Steps end at 1, 2, ..., 40 s except a 5 s first step; loss windows of
    # 10 steps at 0.5, 0.2, 0.09, 0.05.
    ends = [5.0 + i for i in range(40)]
    windows = [[10, 14.0, 0.5], [20, 24.0, 0.2], [30, 34.0, 0.09], [40, 44.0, 0.05]]
    summary = multiworker.summarize({"step_ends": ends, "windows": windows}, 0.1)
    assert summary["step_s"] == 1.0 and summary["steps"] == 40
    assert summary["steps_to_target"] == 30 and summary["time_to_target_s"] == 34.0
    assert summary["final_loss"] == 0.05
    assert (
        multiworker.summarize({"step_ends": ends, "windows": windows}, 0.01)[
            "time_to_target_s"
        ]
        is None
    )
