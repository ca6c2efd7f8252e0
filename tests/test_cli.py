"""`tf-secondorder bench` end to end on a short digits-ae run."""

import json
import os
import sys

import numpy as np
import pytest

from tests.helpers import run_cli_in_subprocess
from tf_secondorder import cli
from tf_secondorder.bench.usage import UsageError


def test_bench_writes_results(tmp_path, data_dir, capsys):
    # 40 steps: refreshes at 20 and 40, four evaluations.
    code = cli.main(
        [
            "bench",
            "--data-dir",
            data_dir,
            "--task",
            "digits-ae",
            "--optimizers",
            "adam,shampoo",
            "--lrs",
            "3e-3",
            "--steps",
            "40",
            "--eval-every",
            "10",
            "--verbose",
            "0",
            "--out",
            str(tmp_path),
            "--shampoo-option",
            "precondition_frequency=20",
            "--shampoo-option",
            "block_size=256",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "steps->tgt" in table and "shampoo" in table
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["task"] == "digits-ae" and report["steps"] == 40
    assert report["baseline"] == "adam" and "(best adam, lr 0.003)" in table
    assert {"tensorflow", "keras", "tf_secondorder"} <= set(report["versions"])
    runs = {r["optimizer"]: r for r in report["runs"]}
    assert runs["shampoo"]["options"]["precondition_frequency"] == 20
    assert report["eval_every"] == 10
    assert [s for s, _ in runs["adam"]["curve"]] == [10, 20, 30, 40]
    assert runs["shampoo"]["root_failures"] == 0
    assert runs["shampoo"]["refresh_step_seconds"] > 0
    # Against the ordinary steps of its kind (statistics updated or not).
    assert runs["shampoo"]["refresh_baseline_seconds"] > 0
    assert runs["shampoo"]["refresh_cost"] == pytest.approx(
        runs["shampoo"]["refresh_step_seconds"]
        / runs["shampoo"]["refresh_baseline_seconds"]
    )
    # The target is the best Adam's final loss, which Adam reaches at its end.
    assert runs["adam"]["steps_to_target"] == 40


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="`task`"):
        cli.main(["bench", "--task", "imagenet", "--steps", "10"])


def test_eval_every_outside_the_run_is_named():
    for value in ("0", "11", "3"):
        with pytest.raises(ValueError, match="`eval_every`.*between 1 and"):
            cli.main(["bench", "--steps", "10", "--eval-every", value])


def test_bench_plots_and_every_optimizer_name(tmp_path, data_dir):
    code = cli.main(
        [
            "bench",
            "--data-dir",
            data_dir,
            "--optimizers",
            "adam,sgd,lion,soap+sign",
            "--lrs",
            "1e-3",
            "--steps",
            "20",
            "--verbose",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert (tmp_path / "loss_vs_steps.png").stat().st_size > 1000
    assert (tmp_path / "loss_vs_time.png").stat().st_size > 1000
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["optimizer"] for r in report["runs"]] == [
        "adam",
        "sgd",
        "lion",
        "soap+sign",
    ]
    for run in report["runs"]:
        assert run["curve"] and all(len(p) == 2 for p in run["curve"])
        assert run["median_step_seconds"] > 0 and "steps_to_target" in run


def test_unknown_optimizer_and_compressor_are_named():
    with pytest.raises(ValueError, match="optimizers"):
        cli.main(["bench", "--optimizers", "adam,adagrad", "--steps", "10"])
    with pytest.raises(ValueError, match="compressor"):
        cli.main(["bench", "--optimizers", "shampoo+zip", "--steps", "10"])


@pytest.mark.parametrize("missing", ["data", "package"])
def test_tfds_task_without_data_says_what_to_do(tmp_path, capsys, monkeypatch, missing):
    # Always the "not available" path, whatever this machine has prepared:
    # an empty data dir (given and as TFDS_DATA_DIR), or no TensorFlow
    # Datasets at all (an import of it fails).
    empty = tmp_path / "tfds"
    empty.mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
    if missing == "package":
        monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    else:
        pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "out"
    code = cli.main(
        ["bench", "--task", "mnist", "--steps", "10"]
        + ["--data-dir", str(empty), "--out", str(out)]
    )
    assert code == 2
    message = capsys.readouterr().err
    assert "mnist" in message and "tensorflow" in message.lower()
    assert "digits-ae" in message  # the offline alternatives
    if missing == "data":
        assert str(empty) in message  # where it looked
    assert not out.exists()  # nothing was run
    assert os.listdir(empty) == []  # and nothing downloaded


def test_bench_with_replicas_reports_bytes(tmp_path, data_dir):
    result = run_cli_in_subprocess(
        [
            "bench",
            "--data-dir",
            data_dir,
            "--replicas",
            "2",
            "--optimizers",
            "adam,adam+sign",
            "--lrs",
            "1e-3",
            "--steps",
            "10",
            "--verbose",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert "bytes/step" in result.stdout
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    plain, sign = runs
    assert (
        plain["replicas"] == 2
        and plain["bytes_per_step"] == plain["float32_bytes_per_step"]
    )
    assert 0 < sign["bytes_per_step"] < plain["bytes_per_step"] / 20
    # Over the run: float32 every step is exactly 1; sign every step matches
    # its per-step ratio (no warm-up by default).
    assert plain["run_bytes_ratio"] == 1.0
    assert sign["run_bytes_ratio"] == sign["bytes_per_step"] / plain["bytes_per_step"]


def test_scale_reports_every_measure_per_configuration(tmp_path, capsys):
    code = cli.main(
        ["scale", "--models", "mlp-1024", "--optimizers", "adam,shampoo"]
        + ["--steps", "3", "--out", str(tmp_path)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| mlp-1024 | 4.2 M | shampoo |" in out
    records = json.loads((tmp_path / "scale.json").read_text())
    assert [r["optimizer"] for r in records] == ["adam", "shampoo"]
    for record in records:
        assert record["parameters"] == 4 * (1024 * 1024 + 1024)
        assert record["first_step_seconds"] > 0 and record["peak_rss_mib"] > 0
        assert record["optimizer_ops"] > 0 and np.isfinite(record["final_loss"])
    adam, shampoo = records
    # Adam keeps 2 copies of the weights; Shampoo also statistics and roots
    # (2 of 256x256 per 256x256 block each) and its snapshot.
    assert adam["state_weight_ratio"] == pytest.approx(2.0, abs=1e-6)
    assert shampoo["state_weight_ratio"] > 6


@pytest.mark.parametrize(
    "args, name",
    [
        (["--models", "mlp-9"], "--models"),
        (["--optimizers", "adam,lbfgs"], "--optimizers"),
        (["--steps", "1"], "--steps"),
        (["--frequency", "0"], "--frequency"),
    ],
)
def test_scale_bad_input_is_named(args, name):
    with pytest.raises(UsageError, match=f"`{name}` must be"):
        cli.main(["scale"] + args)


def test_options_reach_the_run(tmp_path, data_dir):
    # 2 replicas, 4 steps: local SGD averaging the weights only every 2
    # steps, and CompAMS compressing from its first step.
    run_cli_in_subprocess(
        ["bench", "--data-dir", data_dir, "--replicas", "2"]
        + ["--optimizers", "localsgd,compams", "--lrs", "1e-3", "--steps", "4"]
        + ["--option", "localsgd:average_every=2"]
        + ["--option", "localsgd:average_optimizer_state=false"]
        + ["--option", "compams:compression_warmup_steps=0"]
        + ["--verbose", "0", "--out", str(tmp_path)]
    )
    local, compams = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert local["options"] == {"average_every": 2, "average_optimizer_state": False}
    assert compams["options"] == {"compression_warmup_steps": 0}
    # Averages after steps 2 and 4, each of the float32 weights alone.
    assert local["rounds"] == 2
    assert local["bytes_total"] == 2 * local["weight_bytes"]
    # No full-precision warm-up: every step sent the compressed bytes.
    assert compams["bytes_per_step"] < compams["float32_bytes_per_step"] / 20
    assert compams["run_bytes_ratio"] == pytest.approx(
        compams["bytes_per_step"] / compams["float32_bytes_per_step"]
    )


def test_an_optimizer_runs_its_own_learning_rates(tmp_path, data_dir):
    code = cli.main(
        ["bench", "--data-dir", data_dir, "--optimizers", "adam,sgd"]
        + ["--lrs", "1e-3", "--lrs-of", "sgd:0.02,0.05", "--steps", "4"]
        + ["--average-from", "2", "--verbose", "0", "--out", str(tmp_path)]
    )
    assert code == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["optimizer"], r["learning_rate"]) for r in runs] == [
        ("adam", 1e-3),
        ("sgd", 0.02),
        ("sgd", 0.05),
    ]
    # The mean of steps 2, 3 and 4 is scored beside the last iterate.
    for run in runs:
        assert run["average_from"] == 2
        assert [step for step, _ in run["averaged_curve"]] == [
            step for step, _ in run["curve"]
        ]
        assert run["averaged_final_loss"] != run["final_loss"]
