"""Saving: .keras and tf.train.Checkpoint keep the whole state; export serves."""

import copy
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_secondorder as tfso
from tests.helpers import mlp, optimizer_state, regression_data, weights_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Refreshes every 3 steps; 8 steps per epoch, so the resume point (step 8)
# falls between refreshes and both halves contain refreshes.
CONFIG = dict(
    learning_rate=0.01,
    precondition_frequency=3,
    block_size=8,
    epsilon=1e-4,
    statistics_dtype="bfloat16",
    # The memory options: statistics stored once, roots in bfloat16.
    packed_statistics=True,
    preconditioner_dtype="bfloat16",
    grafting="adam",
    nesterov=True,
)


def train(model, opt, epochs):
    x, y = regression_data()
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0)


def run_fresh_process(runs):
    """Runs `resume_worker` once for every (mode, path, out); returns the
    loaded outputs."""
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    subprocess.run(
        [sys.executable, "-m", "tests.optimizers.resume_worker"]
        + ["--config", json.dumps(CONFIG)]
        + [str(part) for run in runs for part in run],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    results = []
    for _, _, out in runs:
        with np.load(out) as f:
            results.append({k: f[k] for k in f.files})
    return results


@pytest.fixture(scope="module")
def uninterrupted():
    model = mlp()
    train(model, tfso.Shampoo(**CONFIG), epochs=2)
    return weights_of(model)


@pytest.fixture(scope="module")
def one_epoch():
    """(model, optimizer) after the first epoch (of `uninterrupted`'s two)."""
    model = mlp()
    opt = tfso.Shampoo(**CONFIG)
    train(model, opt, epochs=1)
    return model, opt


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, one_epoch):
    """The first epoch saved both ways; one fresh process resumes each for
    one more epoch. {mode: (optimizer state as saved, the resumed output)}."""
    tmp = tmp_path_factory.mktemp("saving")
    model, opt = one_epoch
    model.save(str(tmp / "model.keras"))
    checkpoint = tf.train.Checkpoint(model=model, optimizer=opt).write(
        str(tmp / "ckpt")
    )
    saved_state = optimizer_state(opt)
    runs = [
        ("keras", tmp / "model.keras", tmp / "keras.npz"),
        ("checkpoint", checkpoint, tmp / "checkpoint.npz"),
    ]
    results = run_fresh_process(runs)
    return {mode: (saved_state, result) for (mode, _, _), result in zip(runs, results)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["keras", "checkpoint"])
def test_save_load_resume_in_fresh_process(resumed, uninterrupted, mode):
    saved_state, result = resumed[mode]
    assert int(result["iterations"]) == 16
    assert int(result["loaded_state_size"]) == len(saved_state)
    for i, s in enumerate(saved_state):
        np.testing.assert_array_equal(result[f"state{i}"], s)
    # The resumed epoch runs the same ops on the same state as the second
    # epoch of the uninterrupted run (one device, same thread setting):
    # bit for bit.
    for i, w in enumerate(uninterrupted):
        np.testing.assert_array_equal(result[f"arr_{i}"], w)


def test_resume_differs_without_optimizer_state(one_epoch, uninterrupted):
    """Guards the test above: a fresh optimizer on the saved weights drifts."""
    model, _ = one_epoch
    restarted = mlp()
    restarted.set_weights(model.get_weights())
    train(restarted, tfso.Shampoo(**CONFIG), epochs=1)
    diff = max(
        np.abs(a - b).max() for a, b in zip(weights_of(restarted), uninterrupted)
    )
    assert diff > 1e-3


def test_export_serves(tmp_path, one_epoch):
    model, _ = one_epoch
    x, _ = regression_data(n=10, seed=5)
    model.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(
        served.serve(x).numpy(), model.predict(x, verbose=0), rtol=1e-5
    )


def test_config_round_trip():
    schedule = keras.optimizers.schedules.CosineDecay(0.01, 100)
    opt = tfso.Shampoo(
        learning_rate=schedule,
        beta1=0.8,
        beta2=1.0,
        epsilon=1e-8,
        block_size=256,
        precondition_frequency=7,
        start_preconditioning_step=3,
        statistics_frequency=2,
        grafting="rmsprop",
        grafting_epsilon=1e-6,
        nesterov=True,
        exponent_override=6,
        max_preconditioned_dim=5000,
        root_method="coupled_newton",
        statistics_dtype="bfloat16",
        distribute_roots=False,
        weight_decay=0.01,
        clipnorm=1.0,
        use_ema=True,
        loss_scale_factor=4.0,
        gradient_accumulation_steps=2,
        name="my_shampoo",
    )
    serialized = keras.optimizers.serialize(opt)
    again = tfso.Shampoo.from_config(opt.get_config())
    assert keras.optimizers.serialize(again) == serialized

    restored = keras.optimizers.deserialize(copy.deepcopy(serialized))
    assert isinstance(restored, tfso.Shampoo)
    assert keras.optimizers.serialize(restored) == serialized
    config = serialized["config"]
    assert config["precondition_frequency"] == 7 and config["grafting"] == "rmsprop"
    assert config["learning_rate"]["class_name"] == "CosineDecay"


@pytest.mark.parametrize("make", [tfso.Shampoo, tfso.SOAP], ids=["shampoo", "soap"])
def test_a_config_from_before_the_new_options_keeps_its_meaning(make):
    # Saved before `precondition_1d` and Shampoo's `shampoo_beta` existed:
    # vectors were preconditioned and the statistics decayed with beta2.
    config = make().get_config()
    new_keys = ["precondition_1d", "packed_statistics"]
    if make is tfso.Shampoo:
        new_keys += ["shampoo_beta", "preconditioner_dtype"]
    for key in new_keys:
        del config[key]
    old = make.from_config(config)
    assert old.precondition_1d is True and old.packed_statistics is False
    if make is tfso.Shampoo:
        assert old.shampoo_beta is None and old.statistics_beta == old.beta2
    assert make().precondition_1d is False
