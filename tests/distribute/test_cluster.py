"""`tfso.distribute.multi_worker_strategy`: the heartbeat timeout reaches
TensorFlow's coordination service before the strategy configures it."""

import subprocess
import sys

import pytest

import tf_secondorder as tfso

CHECK = """
import json, os
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
    "task": {"type": "worker", "index": 0},
})
import tensorflow as tf
from tf_secondorder.compat import cluster
resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
assert cluster.heartbeat_timeout_ms() is None
assert cluster.configure_coordination_service(resolver, {timeout})
assert cluster.heartbeat_timeout_ms() == int({timeout} * 1000)
# Configured once: a second call (or the strategy's own) changes nothing.
assert not cluster.configure_coordination_service(resolver, 1.0)
assert cluster.heartbeat_timeout_ms() == int({timeout} * 1000)
print("ok")
"""


def test_heartbeat_timeout_is_configured_once():
    done = subprocess.run(
        [sys.executable, "-c", CHECK.replace("{timeout}", "42.5")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), "60"])
def test_bad_heartbeat_timeout_is_named(value):
    with pytest.raises(ValueError, match="^`heartbeat_timeout` must be"):
        tfso.distribute.multi_worker_strategy(heartbeat_timeout=value)


def test_launch_passes_the_timeout_to_the_workers(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(
        "import os; print('timeout', os.environ['TFSO_HEARTBEAT_TIMEOUT'])"
    )
    done = subprocess.run(
        [sys.executable, "-m", "tf_secondorder.cli", "launch", "--workers", "1"]
        + ["--heartbeat-timeout", "77", "--", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "timeout 77.0" in done.stdout
