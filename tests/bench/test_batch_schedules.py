"""`digits-logreg` (its optimum against independent checks) and the bench's
`--batch-schedule` comparison, in one process and under 2 replicas."""

import json

import numpy as np
import pytest

import tf_secondorder as tfso
from tests.helpers import run_cli_in_subprocess
from tf_secondorder import cli
from tf_secondorder.bench import batch_schedules
from tf_secondorder.bench.tasks import digits_logreg
from tf_secondorder.bench.usage import UsageError


@pytest.fixture(scope="module")
def problem(data_dir):
    x, y = digits_logreg.noisy_digits(data_dir)
    return x, y, digits_logreg.newton_optimum(x, y)


def _numeric_gradient(x, y, weights, bias, h=1e-5):
    """Central differences of f on a few coordinates (an independent check:
    no formula for the gradient)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(12):
        i, k = rng.integers(weights.shape[0]), rng.integers(10)
        plus, minus = weights.copy(), weights.copy()
        plus[i, k] += h
        minus[i, k] -= h
        f = digits_logreg.objective
        out.append((f(plus, bias, x, y) - f(minus, bias, x, y)) / (2 * h))
    return np.array(out)


def test_labels_are_noisy_but_fixed(data_dir):
    from tf_secondorder.bench.tasks import digits_images

    _, clean = digits_images(data_dir)
    _, noisy = digits_logreg.noisy_digits(data_dir)
    flipped = np.mean(noisy != clean)
    assert 0.17 < flipped < 0.23  # 20% of 1797 drawn: ±3 standard deviations
    np.testing.assert_array_equal(noisy, digits_logreg.noisy_digits(data_dir)[1])


def test_newton_optimum_is_the_minimum(problem):
    x, y, (weights, bias, optimum) = problem
    # Stationary: central differences (error ~h² f''' ≈ 1e-10) find no slope.
    assert np.abs(_numeric_gradient(x, y, weights, bias)).max() < 1e-8
    # Minimal: strong convexity (λ = 1e-3) puts f(θ* + δ) at least λ/2‖δ‖²
    # above f*, for any δ.
    rng = np.random.default_rng(1)
    for _ in range(5):
        dw, db = rng.normal(size=weights.shape), rng.normal(size=bias.shape)
        dw, db = 1e-2 * dw, 1e-2 * db
        gap = digits_logreg.objective(weights + dw, bias + db, x, y) - optimum
        assert gap >= 0.5 * digits_logreg.L2 * (np.sum(dw**2) + np.sum(db**2)) * 0.999
    # Plain full-batch gradient descent (another method) ends above f*, near it.
    theta = np.zeros((65, 10))
    features = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
    onehot = np.eye(10)[y]
    for _ in range(300):
        logits = features @ theta
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        theta -= 2.0 * (features.T @ (p - onehot) / len(x) + digits_logreg.L2 * theta)
    descent = digits_logreg.objective(theta[:-1], theta[-1], x, y)
    assert optimum <= descent < optimum + 0.05


def test_schedule_text_and_sizes():
    fixed, growing, catalyst = batch_schedules.parse(
        "32,growing:8:1.5:64,catalyst:8:1.5:0.1", replicas=2
    )
    assert catalyst.theta == 0.1 and catalyst.label.startswith("catalyst")
    assert catalyst.sizes(1000, 2) == (
        tfso.data.GrowingBatchSchedule.catalyst(8, 1.5, 1000, 2).batch_sizes()
    )
    assert fixed.sizes(100, 2) == [32, 32, 32]
    sizes = growing.sizes(1000, 2)
    assert sizes[:4] == [8, 12, 18, 26] and max(sizes) == 64
    assert all(s % 2 == 0 for s in sizes) and sum(sizes) <= 1000


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "33",
        "growing:8",
        "growing:8:1.0",
        "growing:8:2:4",
        "grow:8:2",
        "8,,16",
        "catalyst:8:1.5",
        "catalyst:8:1.5:0",
        "catalyst:8:1.5:nan",
    ],
)
def test_bad_schedule_is_named(text):
    with pytest.raises(UsageError, match="`batch_schedule` must be"):
        batch_schedules.parse(text, replicas=2)


def test_growing_reaches_the_fixed_batch_in_fewer_rounds(tmp_path, data_dir, capsys):
    code = cli.main(
        [
            "bench",
            "--data-dir",
            data_dir,
            "--task",
            "digits-logreg",
            "--optimizers",
            "sgd",
            "--lrs",
            "1.0",
            "--batch-schedule",
            "32,growing:16:1.2:1024,catalyst:16:1.2:0.01",
            "--samples",
            "20000",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert "x best fixed" in capsys.readouterr().out
    report = json.loads((tmp_path / "results.json").read_text())
    fixed, growing, catalyst = report["runs"]
    assert fixed["rounds"] == 20000 // 32 and fixed["samples"] == 625 * 32
    assert growing["rounds"] < fixed["rounds"] / 5
    # The paper's ⌊√T⌋ = 141 stages of 141 samples: more rounds than batch 32.
    assert catalyst["rounds"] == len(
        tfso.data.GrowingBatchSchedule.catalyst(16, 1.2, 20000, 1)
    )
    assert catalyst["rounds"] > fixed["rounds"]
    for run in report["runs"]:
        gaps = [loss for _, _, loss in run["curve"]]
        assert all(0 < g < np.inf for g in gaps)
        assert run["curve"][-1][:2] == [run["rounds"], run["samples"]]
    # At lr 1 batches of 16 (Catalyst's restarts) are too noisy to descend.
    for run in (fixed, growing):
        gaps = [loss for _, _, loss in run["curve"]]
        assert gaps[-1] < gaps[0]
    assert (tmp_path / "loss_vs_samples_and_rounds.png").exists()


def test_schedules_under_two_replicas(tmp_path, data_dir):
    run_cli_in_subprocess(
        [
            "bench",
            "--data-dir",
            data_dir,
            "--replicas",
            "2",
            "--task",
            "digits-logreg",
            "--optimizers",
            "sgd",
            "--lrs",
            "0.3",
            "--batch-schedule",
            "64,growing:8:1.3:512",
            "--samples",
            "6000",
            "--out",
            str(tmp_path),
        ]
    )
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert all(r["replicas"] == 2 for r in runs)
    assert runs[1]["rounds"] < runs[0]["rounds"]
    assert all(np.isfinite(r["final_loss"]) and r["final_loss"] > 0 for r in runs)
