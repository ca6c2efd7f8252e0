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
