"""The conv-net and encoder bench tasks: their data, masks and models."""

import keras
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

import tf_secondorder as tfso  # noqa: E402
from tf_secondorder.bench import runner, tasks  # noqa: E402
from tf_secondorder.bench.tasks import pydoc_encoder  # noqa: E402


def _shifts(image):
    """The 9 shifts of an 8x8 image by up to one pixel, zero-filled."""
    padded = np.pad(image, 1)
    return [padded[dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]


def test_digits_cnn_batches_are_shifted_digits_with_their_labels(data_dir):
    task = tasks.get_task("digits-cnn", steps=4, data_dir=data_dir)
    assert task.info["examples"] + task.info["held_out"] == 1797
    x, y = tasks.digits_images(data_dir)
    digits = x.reshape(-1, 8, 8)
    candidates = {}
    for image, label in zip(digits, y):
        for shifted in _shifts(image):
            candidates.setdefault(shifted.tobytes(), set()).add(int(label))
    images, labels = next(iter(task.make_dataset(0)))
    assert images.shape == (64, 8, 8, 1)
    for image, label in zip(images.numpy()[..., 0], labels.numpy()):
        assert int(label) in candidates[image.tobytes()]


def test_digits_cnn_trains_with_conv_statistics_and_batchnorm(data_dir):
    task = tasks.get_task("digits-cnn", steps=60, data_dir=data_dir)
    task.eval_every = 30
    model = task.make_model(0)
    assert any(isinstance(la, keras.layers.BatchNormalization) for la in model.layers)
    optimizer = tfso.Shampoo()
    optimizer.build(model.trainable_variables)
    paths = [
        v.path
        for v in model.trainable_variables
        if optimizer._layout.plans[optimizer._get_variable_index(v)].factors
    ]
    # Every 3x3 conv kernel gets statistics; BatchNorm's vectors do not.
    assert sum("conv2d" in p and "kernel" in p for p in paths) >= 4
    assert not any("batch_normalization" in p for p in paths)
    # The training loss: the held-out one is measured in inference mode, with
    # BatchNorm's moving averages, which lag behind for the first few hundred
    # steps (momentum 0.99).
    model.compile(optimizer=optimizer, loss=task.loss)
    history = model.fit(
        task.make_dataset(0), steps_per_epoch=40, epochs=2, verbose=0
    ).history["loss"]
    assert history[1] < 0.8 * history[0], history
    result = runner.run(task, "shampoo", 3e-3, verbose=0)
    assert np.isfinite(result["final_loss"]) and len(result["curve"]) == 2


def test_pydoc_encoder_masks_like_bert_and_attends_both_ways(data_dir):
    task = tasks.get_task("pydoc-encoder", steps=4, data_dir=data_dir)
    inputs, targets, weights = (t.numpy() for t in next(iter(task.make_dataset(0))))
    chosen = weights == 1.0
    assert set(np.unique(weights)) <= {0.0, 1.0}
    # 4096 positions: the chosen share is 0.15 within ~4 standard deviations.
    assert abs(chosen.mean() - 0.15) < 0.025
    np.testing.assert_array_equal(inputs[~chosen], targets[~chosen])
    masked = inputs[chosen] == pydoc_encoder.MASK_TOKEN
    assert abs(masked.mean() - 0.8) < 0.07
    assert targets.max() < 256 and inputs.max() <= pydoc_encoder.MASK_TOKEN

    model = task.make_model(0)
    changed = inputs[:1].copy()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    first = model(inputs[:1])[0, 0].numpy()
    assert not np.allclose(first, model(changed)[0, 0].numpy())
    # An untrained model predicts about uniformly over 256 bytes.
    assert abs(task.evaluate(model) - np.log(256)) < 0.5


def test_digits_mlp_under_mixed_bfloat16_keeps_float32_logits(data_dir, tmp_path):
    from tf_secondorder import cli

    code = cli.main(
        [
            "bench",
            "--data-dir",
            data_dir,
            "--task",
            "digits-mlp",
            "--optimizers",
            "adam,soap",
            "--lrs",
            "3e-3",
            "--steps",
            "50",
            "--precision",
            "mixed_bfloat16",
            "--verbose",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    import json

    report = json.loads((tmp_path / "results.json").read_text())
    assert report["precision"] == "mixed_bfloat16"
    for run in report["runs"]:
        assert run["precision"] == "mixed_bfloat16"
        losses = [loss for _, loss in run["curve"]]
        assert losses[-1] < 0.5 * losses[0]
    # The policy was for the run only.
    assert keras.mixed_precision.global_policy().name == "float32"
    task = tasks.get_task("digits-mlp", steps=2, data_dir=data_dir)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = task.make_model(0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[0].compute_dtype == "bfloat16"
    assert model.layers[-1].compute_dtype == "float32"
