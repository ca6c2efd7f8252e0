"""Every example runs to completion on its default offline data (few steps)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.slow
def test_shampoo_digits_example(tmp_path):
    out = run_example(
        "shampoo_digits.py",
        "--epochs",
        "3",
        "--strategy",
        "mirrored",
        "--logical-cpus",
        "2",
        "--save",
        str(tmp_path / "digits.keras"),
    )
    accuracy = float(out.split("held-out accuracy")[1].split(",")[0])
    assert accuracy > 0.8
    assert (tmp_path / "digits.keras").exists()


@pytest.mark.slow
def test_custom_loop_strategy_example():
    out = run_example("custom_loop_strategy.py", "--optimizer", "soap", "--steps", "60")
    losses = [
        float(line.split("loss ")[1])
        for line in out.splitlines()
        if line.startswith("step")
    ]
    assert losses[-1] < 0.5 * losses[0]
    assert "on 2 replicas" in out and "root failures 0" in out
    accuracy = float(out.split("held-out accuracy ")[1].split(",")[0])
    assert accuracy > 0.8
