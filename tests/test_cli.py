"""`tf-secondorder bench` end to end on a short T1 run."""

import json

from tf_secondorder import cli


def test_bench_writes_results(tmp_path, capsys):
    code = cli.main(
        [
            "bench",
            "--task",
            "digits-ae",
            "--optimizers",
            "adam,shampoo",
            "--lrs",
            "3e-3",
            "--steps",
            "100",
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
    assert report["task"] == "digits-ae" and report["steps"] == 100
    assert {"tensorflow", "keras", "tf_secondorder"} <= set(report["versions"])
    runs = {r["optimizer"]: r for r in report["runs"]}
    assert runs["shampoo"]["options"]["precondition_frequency"] == 20
    assert [s for s, _ in runs["adam"]["curve"]] == [50, 100]
    assert runs["shampoo"]["root_failures"] == 0
    assert runs["shampoo"]["refresh_step_seconds"] > 0
    # The target is the best Adam's final loss, which Adam reaches at its end.
    assert runs["adam"]["steps_to_target"] == 100


def test_unknown_task_is_named():
    import pytest

    with pytest.raises(ValueError, match="`task`"):
        cli.main(["bench", "--task", "imagenet", "--steps", "10"])
