"""Majority vote, all-gathered or tallied by shard owners, on 2, 4, 5 and 8 replicas.

Two replicas run in this process on the session's MirroredStrategy; more need
a fresh process with that many logical CPUs (`majority_vote_run.py`). Signs
and vote counts are exact, so every comparison is bit for bit: against a
NumPy vote, between the two protocols, and between the replicas.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.distribute import majority_vote_run as run
from tf_secondorder.distribute import voting

# One test process runs the whole module (setup.cfg: `--dist loadgroup`), so
# the module-scoped `runs` starts each replica count's process once.
pytestmark = pytest.mark.xdist_group("majority_vote")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = [int(np.prod(s)) for s in run.SHAPES]
# 4 and 8 replicas start a process each (about a minute on 2 cores).
REPLICAS = [
    2,
    pytest.param(4, marks=pytest.mark.slow),
    pytest.param(8, marks=pytest.mark.slow),
]


def _in_subprocess(tmp_path_factory, replicas, *extra):
    out = tmp_path_factory.mktemp("vote") / f"vote-{replicas}.npz"
    done = subprocess.run(
        [sys.executable, "-m", "tests.distribute.majority_vote_run"]
        + [str(replicas), str(out), *extra],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def runs(mirrored, tmp_path_factory):
    """replicas -> what `majority_vote_run.collect` returned there (lazily)."""
    cache = {}

    def get(replicas):
        if replicas not in cache:
            cache[replicas] = (
                run.collect(mirrored)
                if replicas == 2
                else _in_subprocess(tmp_path_factory, replicas)
            )
        return cache[replicas]

    return get


def numpy_vote(inputs, codec):
    """sign(Σ_r sign(decoded_r)) with ties → +1; a scaled sign with a zero
    scale (mean |x| of its bucket or tensor) decodes to 0 and abstains."""
    bucket = {"sign": None, "scaled_sign": None, "scaled_sign32": 32}[codec]
    votes = np.zeros(inputs.shape[1])
    for x in inputs.astype(np.float64):
        parts = []
        for part in np.split(x, np.cumsum(SIZES)[:-1]):
            signs = np.where(part < 0, -1.0, 1.0)
            if codec != "sign":
                step = bucket or part.size
                for start in range(0, part.size, step):
                    if not np.any(part[start : start + step]):
                        signs[start : start + step] = 0.0
            parts.append(signs)
        votes += np.concatenate(parts)
    return np.where(votes >= 0, 1.0, -1.0), votes


def expected_words(codec, replicas):
    """(all-gather, sharded) int32 words (handed over, delivered) for SHAPES:
    a plane's tensors each start a word; the step's first collective carries
    one "not finite" flag (per row of an all_to_all)."""
    n = replicas
    signs = sum(-(-size // 32) for size in SIZES)
    scales = {
        "sign": 0,
        "scaled_sign": len(SIZES),
        "scaled_sign32": sum(-(-s // 32) for s in SIZES),
    }[codec]
    planes = 1 if codec == "sign" else 2
    shard = -(-signs // n)
    gather = (signs + scales + 1, n * (signs + scales + 1))
    both_ways = n * (planes * shard + 1) + n * shard
    return gather, (both_ways, both_ways)


@pytest.mark.parametrize("replicas", REPLICAS)
@pytest.mark.parametrize("codec", run.CODECS)
def test_vote_matches_numpy_on_both_protocols(runs, replicas, codec):
    arrays = runs(replicas)
    inputs = arrays["inputs"]
    assert int(arrays["replicas"]) == replicas == len(inputs)
    want, votes = numpy_vote(inputs, codec)
    assert np.any(votes == 0)  # ties (→ +1) were exercised
    if codec != "sign":
        assert not np.all(np.isin(votes, [-replicas, replicas]))
    for path in run.PATHS:
        got = arrays[f"{codec}/{path}/aggregates"]
        for replica in got:  # every replica holds the same vote
            np.testing.assert_array_equal(replica, want, err_msg=f"{codec}/{path}")


@pytest.mark.parametrize("replicas", REPLICAS)
@pytest.mark.parametrize("codec", run.CODECS)
def test_bytes_and_the_automatic_choice(runs, replicas, codec):
    arrays = runs(replicas)
    gather, sharded = expected_words(codec, replicas)
    for path, (sent, received), rounds in (
        ("gather", gather, 1),
        ("sharded", sharded, 2),
    ):
        key = f"{codec}/{path}"
        assert str(arrays[f"{key}/path"]) == path
        assert int(arrays[f"{key}/bytes"]) == 4 * sent, key
        assert int(arrays[f"{key}/received"]) == 4 * received, key
        assert int(arrays[f"{key}/rounds"]) == rounds, key
    # "auto" takes whichever delivers fewer bytes; a tie (2 replicas, Sign)
    # goes to the all-gather's one collective. A scale per 32 elements costs
    # the all-gather a bit per element, so there the sharded vote wins at 2.
    chosen = "sharded" if sharded[1] < gather[1] else "gather"
    assert str(arrays[f"{codec}/auto/path"]) == chosen
    if codec == "sign":
        assert chosen == ("gather" if replicas == 2 else "sharded")
    if replicas == 8:
        # Each way about d bits of votes and d bits of results: what a
        # replica receives is what it sends.
        assert arrays[f"{codec}/auto/received"] <= 1.1 * arrays[f"{codec}/auto/bytes"]


@pytest.mark.parametrize("replicas", REPLICAS[:2])
def test_signsgd_in_fit_is_the_same_on_both_protocols(runs, replicas):
    """model.fit with the automatic protocol against one forced to all-gather:
    the same weights bit for bit, on every replica."""
    arrays = runs(replicas)
    count = len([k for k in arrays if k.startswith("fit_auto/weight")])
    assert count == 4
    for i in range(count):
        for label in ("fit_auto", "fit_gather"):
            assert bool(arrays[f"{label}/replicas_agree{i}"]), (label, i)
        np.testing.assert_array_equal(
            arrays[f"fit_auto/weight{i}"], arrays[f"fit_gather/weight{i}"]
        )
    initial, final = arrays["fit_auto/loss"]
    assert final < initial / 2
    sign_words = sum(-(-int(p) // 32) for p in (8 * 64, 64, 64 * 3, 3))
    shard = -(-sign_words // replicas)
    steps = 4 * 320 // 40
    if replicas == 2:
        assert str(arrays["fit_auto/path"]) == "gather"
    else:
        assert str(arrays["fit_auto/path"]) == "sharded"
        words = replicas * (shard + 1) + replicas * shard
        assert int(arrays["fit_auto/bytes"]) == 4 * words
        assert int(arrays["fit_auto/received"]) == 4 * words
        assert int(arrays["fit_auto/rounds"]) == 2 * steps
    assert int(arrays["fit_gather/bytes"]) == 4 * (sign_words + 1)
    assert int(arrays["fit_gather/received"]) == 4 * replicas * (sign_words + 1)
    assert int(arrays["fit_gather/rounds"]) == steps


def test_the_rule_and_bad_path():
    # Sign, one plane: ties at 2 replicas, the sharded vote from 3 on.
    assert not voting.sharded_is_cheaper(2, 600, 600, 1)
    assert voting.sharded_is_cheaper(3, 600, 600, 1)
    assert voting.received_words(8, 600, 600, 1) == (8 * 601, 8 * 76 + 8 * 75)
    # A one-word model: the flags dominate and the all-gather stays.
    assert not voting.sharded_is_cheaper(4, 1, 1, 1)
    with pytest.raises(ValueError, match="`path`"):
        voting.MajorityVote(run._codec("sign"), path="scatter")


def test_auto_keeps_the_all_gather_without_an_all_to_all_kernel(tmp_path_factory):
    """MirroredStrategy with ReductionToOneDevice has no all_to_all kernel.
    With a scale per 32 elements the sharded vote would deliver fewer bytes
    at 3 replicas, but emulated it delivers N times what it sends; "auto"
    keeps the all-gather and sends nothing for the probe. Forced, the
    emulation gives the same vote and counts its bytes as gathers."""
    arrays = _in_subprocess(tmp_path_factory, 3, "no_all_to_all")
    for codec in ("sign", "scaled_sign32"):
        want, _ = numpy_vote(arrays["inputs"], codec)
        for path in run.PATHS:
            for replica in arrays[f"{codec}/{path}/aggregates"]:
                np.testing.assert_array_equal(replica, want)
        gather, sharded = expected_words(codec, 3)
        assert str(arrays[f"{codec}/auto/path"]) == "gather"
        assert int(arrays[f"{codec}/auto/bytes"]) == 4 * gather[0]
        assert int(arrays[f"{codec}/auto/received"]) == 4 * gather[1]
        assert str(arrays[f"{codec}/sharded/path"]) == "sharded"
        sent = int(arrays[f"{codec}/sharded/bytes"])
        assert sent == 4 * sharded[0]
        assert int(arrays[f"{codec}/sharded/received"]) == 3 * sent


@pytest.fixture(scope="module")
def byzantine(tmp_path_factory):
    return _in_subprocess(tmp_path_factory, 5, "byzantine")


@pytest.mark.slow
def test_vote_follows_the_honest_majority_where_its_margin_exceeds_one(byzantine):
    """One adversary of 5 can change a coordinate only where the 4 honest
    replicas' signs sum to 0 (margin ≤ 1 adversary); elsewhere the vote is
    the honest replicas' majority."""
    inputs = byzantine["vote_inputs"]
    honest = np.delete(np.where(inputs < 0, -1, 1), run.ADVERSARY, axis=0).sum(0)
    attacked = byzantine["attacked_vote"]
    for replica in attacked:
        safe = np.abs(honest) > 1
        np.testing.assert_array_equal(replica[safe], np.sign(honest[safe]))
    # The adversary's −sign pulls the tied honest coordinates its way.
    adversary = -np.where(inputs[run.ADVERSARY] < 0, -1, 1)
    tied = honest == 0
    assert np.any(tied)
    np.testing.assert_array_equal(
        attacked[0][tied], np.where(adversary[tied] >= 0, 1.0, -1.0)
    )


@pytest.mark.slow
def test_signum_trains_with_one_of_five_replicas_negating_its_signs(byzantine):
    """Signum (β = 0.9, majority vote) on the 8→64→3 regression, 5 replicas,
    6 epochs of 8 steps; replica 4 sends the negation of its signs every
    step. Measured: MSE 1.19 → 0.1514 all-honest and → 0.1517 with the
    adversary. One adversary of 5 flips only the coordinates where the 4
    honest signs tie, so training keeps nearly all its progress. Asked here:
    the attacked run lowers the loss by more than half, and the adversary
    did act (the runs differ)."""
    h_initial, h_final = byzantine["honest/loss"]
    b_initial, b_final = byzantine["byzantine/loss"]
    assert h_initial == b_initial
    assert b_final < b_initial / 2
    assert b_final != h_final
