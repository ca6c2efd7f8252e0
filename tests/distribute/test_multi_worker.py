"""Real worker processes on 127.0.0.1 training with model.fit.

One launch of two workers runs `multi_worker_train.py` (gRPC between
processes, MultiWorkerMirroredStrategy): every config once, then the restart
test — worker 1 kills itself in the middle of epoch 2, the launcher restarts
both workers and they resume from `tfso.callbacks.BackupAndRestore`. The same
training under the session's 2-replica MirroredStrategy in this process is
the reference, and one float64 run on one device measures float32 rounding.
"""

import io
import json
import os
import sys

import numpy as np
import pytest

from tests.distribute import multi_worker_train
from tests.helpers import assert_agree_to_rounding, assert_root_matches_reference
from tf_secondorder.compat import keras_patches
from tf_secondorder.distribute import launch as launcher

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(__file__), "multi_worker_train.py")
# Shampoo alone, a compressed Adam, Shampoo with biased compression and
# per-replica error-feedback memories (the state a restart must not lose),
# and Shampoo with roots computed on each worker's host (pipelined).
CONFIGS = ["shampoo", "adam+qsgd", "shampoo+scaled_sign", "shampoo-pipelined"]
# The workers also train Shampoo with every root on every worker, to compare
# with the split refresh.
PLAIN_CONFIGS = CONFIGS + ["shampoo-unsplit"]
KILLED = "shampoo+scaled_sign"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mirrored):
    tmp = tmp_path_factory.mktemp("multi_worker")
    out = io.StringIO()
    code = launcher.launch(
        [sys.executable, SCRIPT]
        + ["--out", str(tmp / "mw"), "--configs", ",".join(PLAIN_CONFIGS)]
        + ["--backup", str(tmp / "b1"), "--kill-config", KILLED, "--kill", "1,1,3"]
        + ["--killed-out", str(tmp / "killed"), "--killed-backup", str(tmp / "b2")],
        workers=2,
        timeout=500,
        out=out,
        max_restarts=1,
        env=dict(os.environ, PYTHONPATH=ROOT),
        # After worker 1 kills itself, worker 0 is stopped (it waits in a
        # collective and has nothing to save): 1 s before SIGKILL, not 5.
        grace=1.0,
    )
    log = out.getvalue()
    assert code == 0, log[-6000:]
    mirrored_runs = {
        config: multi_worker_train.train_config(mirrored, config) for config in CONFIGS
    }
    return {"dir": tmp, "log": log, "mirrored": mirrored_runs}


@pytest.fixture(scope="module")
def float64_unsplit():
    """Shampoo with every root on one device, in float64: the same training
    (same initial weights and data, widened exactly) without float32 rounding."""
    return multi_worker_train.train_config(None, "shampoo-unsplit", dtype="float64")


def _load(runs, run, config, worker):
    with np.load(runs["dir"] / run / f"{config}-worker{worker}.npz") as f:
        return {k: f[k] for k in f.files}


def _per_replica(arrays):
    return {k for k in arrays["per_replica"] if k}


@pytest.mark.parametrize("config", CONFIGS)
def test_two_workers_finish_with_identical_weights_and_state(runs, config):
    w0, w1 = (_load(runs, "mw", config, i) for i in (0, 1))
    # Replicas of one run hold the same weights and the same (gathered,
    # reduced) optimizer state, bit for bit; only per-replica memories differ.
    shared = [
        k
        for k in w0
        if k.startswith(("w", "o", "first/o"))
        and k.split("/")[-1] not in _per_replica(w0)
    ]
    assert any(k.startswith("w") for k in shared)
    assert any(k.startswith("o") for k in shared)
    for key in shared:
        np.testing.assert_array_equal(w0[key], w1[key], err_msg=key)
    assert w0["loss"][-1] < 0.5 * w0["loss"][0]
    assert "plain configs done" in runs["log"]


@pytest.mark.parametrize("config", CONFIGS)
def test_two_workers_match_two_mirrored_replicas(runs, config):
    workers = [_load(runs, "mw", config, i) for i in (0, 1)]
    mirrored = runs["mirrored"][config]
    keys = [k for k in mirrored if k.startswith(("w", "o", "loss"))]
    assert keys
    for key in keys:
        expected = mirrored[key]
        if key in _per_replica(mirrored):
            # Per-replica state: each worker holds its own replica's row.
            got = np.concatenate([w[key] for w in workers])
        else:
            got = workers[0][key]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=key)


def test_roots_split_across_workers_match_unsplit_roots(runs, float64_unsplit):
    """ "shampoo" splits the root work between the workers (all_gather at each
    refresh); "shampoo-unsplit" computes every root on every worker.

    Up to the first refresh (step 3) both execute the same ops: statistics
    equal bit for bit. A refresh batches other matrices together on each
    worker, and kernels round with the batch (and instruction set, threads,
    oneDNN), so roots agree to float32 rounding: each is within
    `inverse_root_tolerance` of the float64 root of its own statistics. The
    weights and other state carry that rounding through 21 more steps: they
    agree to within the rounding error of the whole training, measured as the
    unsplit run's distance to a float64 run.
    """
    epsilon = multi_worker_train.EPSILON
    for worker in (0, 1):
        split = _load(runs, "mw", "shampoo", worker)
        unsplit = _load(runs, "mw", "shampoo-unsplit", worker)
        assert split.keys() == unsplit.keys()
        np.testing.assert_array_equal(split["factors"], unsplit["factors"])
        assert len(split["factors"])
        for stats, root, row, p in split["factors"]:
            # Same ops up to the first refresh.
            np.testing.assert_array_equal(
                split[f"first/o{stats}"], unsplit[f"first/o{stats}"]
            )
            for arrays in (split, unsplit):
                for prefix in ("first/", ""):
                    assert_root_matches_reference(
                        arrays[f"{prefix}o{root}"][row],
                        arrays[f"{prefix}o{stats}"][row],
                        int(p),
                        epsilon,
                        "eigh",
                        f"worker {worker} {prefix}o{root}",
                    )
        # Float32 rounding of the whole training, measured against float64
        # (see `assert_agree_to_rounding`); per array, as the state holds
        # counters next to weights.
        keys = [
            k
            for k in unsplit
            if k.startswith(("w", "o")) and np.issubdtype(unsplit[k].dtype, np.number)
        ]
        assert keys
        for key in keys:
            assert_agree_to_rounding(
                split[key], unsplit[key], float64_unsplit[key], (worker, key)
            )


def test_per_replica_memories_differ_between_workers(runs):
    w0, w1 = (_load(runs, "mw", "shampoo+scaled_sign", i) for i in (0, 1))
    per_replica = _per_replica(w0)
    assert per_replica
    assert all(w0[k].shape[0] == 1 for k in per_replica)
    assert any(not np.array_equal(w0[k], w1[k]) for k in per_replica)


def test_the_multi_worker_fix_was_used(runs):
    for worker in (0, 1):
        calls = json.loads(
            (runs["dir"] / "mw" / f"hooks-worker{worker}.json").read_text()
        )
        needed = keras_patches.multi_worker_fixes_needed()
        assert calls["reduce"] > 0 and calls["update"] > 0
        if needed["symbolic_build"]:
            assert calls.get("multi_worker_build", 0) == len(PLAIN_CONFIGS)
        if needed["reduce_per_replica"]:
            assert calls.get("multi_worker_reduce", 0) > 0


def test_killed_and_relaunched_run_equals_uninterrupted(runs):
    log = runs["log"]
    assert "killing myself at epoch 1 batch 3" in log
    assert "[launch] restart 1 of 1" in log
    # The plain configs ran once, in the first attempt; both workers finished
    # the second.
    assert log.count("plain configs done") == 2
    assert log.count("finished") == 2
    for worker in (0, 1):
        resumed = _load(runs, "killed", KILLED, worker)
        uninterrupted = _load(runs, "mw", KILLED, worker)
        # The relaunch trains epochs 2 and 3 only.
        np.testing.assert_array_equal(resumed["loss"], uninterrupted["loss"][1:])
        # Same ops from the same state on the same processes: bit for bit.
        # (Layer names, and so `paths`, differ between the processes.)
        keys = [k for k in uninterrupted if k.startswith(("w", "o", "factors"))]
        assert any(k.startswith("o") for k in keys)
        for key in keys:
            np.testing.assert_array_equal(resumed[key], uninterrupted[key], key)
    # Training ended normally, so the backups were cleaned up.
    assert not os.path.exists(runs["dir"] / "b2" / KILLED)
