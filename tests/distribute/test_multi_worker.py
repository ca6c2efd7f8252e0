"""Real worker processes on 127.0.0.1 training with model.fit.

Two workers run `multi_worker_train.py` through the launcher (gRPC between
processes, MultiWorkerMirroredStrategy); the same script under a 2-replica
MirroredStrategy in one process is the reference. A third launch kills
worker 1 in the middle of epoch 2 and restarts both workers, which resume
from `tfso.callbacks.BackupAndRestore`.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tf_secondorder.distribute import _keras_hooks
from tf_secondorder.distribute import launch as launcher

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(__file__), "multi_worker_train.py")
# Shampoo alone, a compressed Adam, and Shampoo with biased compression and
# per-replica error-feedback memories (the state a restart must not lose).
CONFIGS = ["shampoo", "adam+qsgd", "shampoo+scaled_sign"]
# The plain multi-worker run also trains Shampoo with every root on every
# worker, to compare with the split refresh.
PLAIN_CONFIGS = CONFIGS + ["shampoo-unsplit"]


def _launch(args, tmp, **kwargs):
    out = io.StringIO()
    code = launcher.launch(
        [sys.executable, SCRIPT] + args, workers=2, timeout=400, out=out, **kwargs
    )
    assert code == 0, out.getvalue()[-6000:]
    return out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_worker")
    configs = ",".join(CONFIGS)
    plain = _launch(
        ["--out", str(tmp / "mw"), "--configs", ",".join(PLAIN_CONFIGS)]
        + ["--backup", str(tmp / "b1")],
        tmp,
    )
    mirrored = subprocess.run(
        [sys.executable, SCRIPT, "--strategy", "mirrored"]
        + ["--out", str(tmp / "mirrored"), "--configs", configs],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert mirrored.returncode == 0, mirrored.stderr[-6000:]
    killed = _launch(
        ["--out", str(tmp / "killed"), "--configs", "shampoo+scaled_sign"]
        + ["--backup", str(tmp / "b2"), "--kill", "1,1,3"],
        tmp,
        max_restarts=1,
    )
    return {"dir": tmp, "plain": plain, "killed": killed}


def _load(runs, run, config, worker):
    with np.load(runs["dir"] / run / f"{config}-worker{worker}.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("config", CONFIGS)
def test_two_workers_finish_with_identical_weights(runs, config):
    w0, w1 = (_load(runs, "mw", config, i) for i in (0, 1))
    weights = sorted(k for k in w0 if k.startswith("w"))
    assert weights
    for key in weights:
        np.testing.assert_array_equal(w0[key], w1[key])
    assert w0["loss"][-1] < 0.5 * w0["loss"][0]
    assert runs["plain"].count("finished") == 2


@pytest.mark.parametrize("config", CONFIGS)
def test_two_workers_match_two_mirrored_replicas(runs, config):
    workers = [_load(runs, "mw", config, i) for i in (0, 1)]
    mirrored = _load(runs, "mirrored", config, 0)
    for key, expected in mirrored.items():
        if key.startswith("o") and workers[0][key].shape != expected.shape:
            # Per-replica state: each worker holds its own replica's row.
            got = np.concatenate([w[key] for w in workers])
        else:
            got = workers[0][key]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=key)


def test_roots_split_across_workers_equal_unsplit_roots(runs):
    # "shampoo" splits the root work between the two workers (all_gather at
    # each refresh); "shampoo-unsplit" computes every root on every worker.
    for worker in (0, 1):
        split = _load(runs, "mw", "shampoo", worker)
        unsplit = _load(runs, "mw", "shampoo-unsplit", worker)
        assert split.keys() == unsplit.keys()
        for key in split:
            np.testing.assert_array_equal(split[key], unsplit[key], err_msg=key)


def test_per_replica_memories_differ_between_workers(runs):
    w0, w1 = (_load(runs, "mw", "shampoo+scaled_sign", i) for i in (0, 1))
    per_replica = [
        k for k in w0 if k.startswith("o") and w0[k].ndim and w0[k].shape[0] == 1
    ]
    assert per_replica
    assert any(not np.array_equal(w0[k], w1[k]) for k in per_replica)


def test_the_multi_worker_fix_was_used(runs):
    for worker in (0, 1):
        calls = json.loads(
            (runs["dir"] / "mw" / f"hooks-worker{worker}.json").read_text()
        )
        needed = _keras_hooks.multi_worker_fixes_needed()
        assert calls["reduce"] > 0 and calls["update"] > 0
        if needed["symbolic_build"]:
            assert calls.get("multi_worker_build", 0) == len(PLAIN_CONFIGS)
        if needed["reduce_per_replica"]:
            assert calls.get("multi_worker_reduce", 0) > 0


def test_killed_and_relaunched_run_equals_uninterrupted(runs):
    log = runs["killed"]
    assert "killing myself at epoch 1 batch 3" in log
    assert "[launch] restart 1 of 1" in log
    assert log.count("finished") == 2
    for worker in (0, 1):
        resumed = _load(runs, "killed", "shampoo+scaled_sign", worker)
        uninterrupted = _load(runs, "mw", "shampoo+scaled_sign", worker)
        # The relaunch trains epochs 2 and 3 only.
        np.testing.assert_array_equal(resumed["loss"], uninterrupted["loss"][1:])
        for key, value in uninterrupted.items():
            if key != "loss":
                np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    # Training ended normally, so the backups were cleaned up.
    assert not os.path.exists(runs["dir"] / "b2" / "shampoo+scaled_sign")
