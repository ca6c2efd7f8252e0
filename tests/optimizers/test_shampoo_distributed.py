"""Root refreshes split across replicas (SPEC §3.4) match the unsplit ones.

Two replicas run in this process on the session's MirroredStrategy; four need
a fresh process with four logical CPUs (`split_roots_run.py`).

What is exact and what agrees to rounding:

* All replicas of one run hold the same weights and state bit for bit: the
  gathered roots are one tensor copied to every replica.
* Up to the first refresh a split and an unsplit run execute the same ops,
  so their statistics and grafting accumulators are equal bit for bit.
* A split refresh batches other matrices together than an unsplit one, and
  vectorised kernels round a matrix differently with its batch (and with the
  instruction set, the thread count, oneDNN): roots agree to float32 rounding,
  each within `tests.helpers.inverse_root_tolerance` of the float64 root of
  the same statistics. The weights and state, which carry that rounding
  through later steps, agree to the rounding error of the whole training,
  measured against the same training in float64.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import (
    assert_agree_to_rounding,
    assert_root_matches_reference,
    inverse_root_tolerance,
)
from tests.optimizers import split_roots_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _four_replicas(tmp_path):
    """The split run on 4 logical CPUs, in a fresh process."""
    out = tmp_path / "split-4.npz"
    done = subprocess.run(
        [sys.executable, "-m", "tests.optimizers.split_roots_run"]
        + ["4", str(out), "eigh", "split"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def float64_run():
    """The same training, unsplit on one device, in float64 (eigh roots)."""
    snapshots, _, failures = split_roots_run.train(None, False, "eigh", "float64")
    assert failures == 0
    return snapshots


@pytest.fixture(scope="module")
def two_replicas(mirrored):
    """Split and unsplit runs on the session's 2-replica MirroredStrategy."""
    return split_roots_run.collect(mirrored, "eigh")


def _keys(arrays, label, stage, prefix):
    start = f"{label}/{stage}/"
    keys = sorted(k[len(start) :] for k in arrays if k.startswith(start + prefix))
    assert keys, (label, stage, prefix)
    return keys


def _factors(arrays, label, stage):
    return [
        k[: -len("/root")]
        for k in _keys(arrays, label, stage, "factor/")
        if k.endswith("/root")
    ]


def _check_run(arrays, label, replicas, method):
    """One run: no root rejected; its replicas hold the same weights and
    state bit for bit; every root is its statistics' root to float32
    rounding and moved away from the identity start."""
    assert int(arrays[f"{label}/root_failures"]) == 0, label
    epsilon = split_roots_run.EPSILON
    for stage in ("first", "end"):
        counts = arrays[f"{label}/{stage}/replica_counts"]
        assert counts.size and np.all(counts == replicas), (label, stage)
        assert list(arrays[f"{label}/{stage}/replicas_disagree"]) == [""]
        for factor in _factors(arrays, label, stage):
            root = arrays[f"{label}/{stage}/{factor}/root"]
            assert_root_matches_reference(
                root,
                arrays[f"{label}/{stage}/{factor}/statistics"],
                int(arrays[f"{label}/{stage}/{factor}/p"]),
                epsilon,
                method,
                f"{label}/{stage}/{factor}",
            )
            assert not np.allclose(root, np.eye(len(root))), (label, stage, factor)


def _check_shares(arrays, replicas):
    """Recorded when traced: one share per replica, together every factor
    exactly once; an unsplit run computes everything in one call."""
    count = len(_factors(arrays, "split", "end"))
    assert int(arrays["split/share_count"]) == replicas
    assert sorted(arrays["split/shares"]) == list(range(count))
    if "unsplit/share_count" in arrays:
        assert int(arrays["unsplit/share_count"]) == 1
        assert sorted(arrays["unsplit/shares"]) == list(range(count))


def _check_split_against_unsplit(arrays, method):
    epsilon = split_roots_run.EPSILON
    # Same ops up to the first refresh: bit for bit.
    accumulators = [
        k for k in _keys(arrays, "split", "first", "state/") if "accumulator" in k
    ]
    statistics = [
        k
        for k in _keys(arrays, "split", "first", "factor/")
        if k.endswith("/statistics")
    ]
    assert accumulators and statistics
    for key in accumulators + statistics:
        np.testing.assert_array_equal(
            arrays[f"split/first/{key}"], arrays[f"unsplit/first/{key}"], key
        )
    # Equal statistics, so each pair of first roots is within the sum of
    # their bounds of each other.
    for factor in _factors(arrays, "split", "first"):
        stats = arrays[f"split/first/{factor}/statistics"]
        p = int(arrays[f"split/first/{factor}/p"])
        split, unsplit = (
            arrays[f"{x}/first/{factor}/root"] for x in ("split", "unsplit")
        )
        bound = 2 * inverse_root_tolerance(stats, p, epsilon, method)
        scale = np.linalg.norm(unsplit.astype(np.float64), 2)
        assert np.linalg.norm(split - unsplit) <= bound * scale, factor


def _check_against_float64(got, want, float64_run, label="split"):
    """Weights and state of run `label` in `got` equal the unsplit run's in
    `want` to within the float32 rounding error of this training, measured
    as the unsplit run's distance to the same training in float64 (see
    `assert_agree_to_rounding`; measured here: split and unsplit differ only
    by the roots' rounding, at most 0.33x that distance)."""
    for stage in ("first", "end"):
        for kind in ("weight/", "state/"):
            for key in _keys(want, "unsplit", stage, kind):
                assert_agree_to_rounding(
                    got[f"{label}/{stage}/{key}"],
                    want[f"unsplit/{stage}/{key}"],
                    float64_run[stage][key],
                    (label, stage, key),
                )


def test_split_refresh_matches_unsplit_and_shares_are_disjoint(
    two_replicas, float64_run
):
    arrays = two_replicas
    _check_shares(arrays, 2)
    for label in ("split", "unsplit"):
        _check_run(arrays, label, 2, "eigh")
    _check_split_against_unsplit(arrays, "eigh")
    _check_against_float64(arrays, arrays, float64_run)


@pytest.mark.slow
def test_split_refresh_on_four_replicas(tmp_path, two_replicas, float64_run):
    # Only the split run, in a fresh process with 4 logical CPUs; the same-ops
    # comparison with an unsplit run is the 2-replica test's. Its weights are
    # compared with the 2-replica unsplit run's: another float32 evaluation
    # of the same training (gradients reduced over 4 replicas, not 2).
    arrays = _four_replicas(tmp_path)
    _check_shares(arrays, 4)
    _check_run(arrays, "split", 4, "eigh")
    _check_against_float64(arrays, two_replicas, float64_run)


def test_split_refresh_with_coupled_newton_matches_unsplit(mirrored, float64_run):
    # XLA's batched matmuls round with the batch too; the roots are checked
    # against the float64 eigh root with the coupled Newton error bound.
    arrays = split_roots_run.collect(mirrored, "coupled_newton")
    _check_shares(arrays, 2)
    for label in ("split", "unsplit"):
        _check_run(arrays, label, 2, "coupled_newton")
    _check_split_against_unsplit(arrays, "coupled_newton")
    _check_against_float64(arrays, arrays, float64_run)
