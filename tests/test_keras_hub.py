"""keras-hub's GPT-2, built from a config, trains with Shampoo, SOAP and a
compressed optimizer under MirroredStrategy on 2 logical CPUs.

keras-hub needs the full `tensorflow` build (its tensorflow-text requires
it), so most of this file runs in its own environment: CI's second step
makes a fresh venv with `pip install -e ".[gpu,bench,hub,test]"` and runs
`python -m pytest tests/test_keras_hub.py -q` there. In the main environment
(tensorflow-cpu, no keras-hub) those tests skip; the ones that need no
keras-hub run in both.

The model is the `pydoc-gpt2` bench task's at context 64 and batch 8: the
shapes of a real model (a tied `[vocabulary, hidden]` embedding used at both
ends, 3-D attention kernels, LayerNorm vectors), few steps each.
"""

import importlib.metadata
import sys

import numpy as np
import pytest

import tf_secondorder as tfso
from tests.test_examples import run_example
from tf_secondorder import cli
from tf_secondorder.bench import tasks
from tf_secondorder.bench.tasks import pydoc_language_models

STEPS = 6
CONTEXT = 64
HUB_INSTALL = 'pip install -e ".[gpu,bench,hub]"'


@pytest.fixture(scope="module")
def keras_hub():
    return pytest.importorskip("keras_hub")


@pytest.fixture(scope="module")
def task(keras_hub, tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return pydoc_language_models.pydoc_gpt2(
        steps=STEPS, context=CONTEXT, batch_size=8, eval_windows=32, data_dir=data_dir
    )


def _installed(name):
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_one_tensorflow_build_is_installed():
    """tensorflow and tensorflow-cpu are one package built twice: installed
    together (e.g. the `hub` extra next to the `cpu` one) they overwrite each
    other's files. Both install routes, `.[cpu,bench,test]` and
    `.[gpu,bench,hub,test]`, end with exactly one."""
    builds = [n for n in ("tensorflow", "tensorflow-cpu") if _installed(n)]
    assert len(builds) == 1, builds
    if _installed("keras-hub"):
        assert builds == ["tensorflow"]


def test_without_keras_hub_the_bench_says_what_to_install(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # its import fails
    data_dir, out = tmp_path / "tfds", tmp_path / "out"
    data_dir.mkdir()
    code = cli.main(
        ["bench", "--task", "pydoc-gpt2", "--steps", "10"]
        + ["--data-dir", str(data_dir), "--out", str(out)]
    )
    assert code == 2
    message = capsys.readouterr().err
    assert "pydoc-gpt2" in message and HUB_INSTALL in message
    assert not out.exists() and not list(data_dir.iterdir())  # nothing done


def test_task_ids_are_byte_tokenizer_ids(keras_hub):
    from pydoc_data import topics

    text = "".join(topics.topics[k] for k in sorted(topics.topics))
    tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    corpus, _ = tasks.pydoc_corpus()
    np.testing.assert_array_equal(np.asarray(tokenizer(text)), corpus)


def _token_embedding(model):
    (embedding,) = [
        v
        for v in model.trainable_variables
        if v.path.endswith("token_embedding/embeddings")
    ]
    return embedding


def train(task, strategy, make_optimizer):
    """(model, optimizer, held-out loss before, after, embedding before)."""
    import keras

    with strategy.scope():
        model = task.make_model(0)
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)
        model.compile(optimizer=optimizer, loss=task.loss)
    embedding = _token_embedding(model)
    # Tied: the logits come from the token embedding, no output kernel.
    assert embedding.shape == (256, 128)
    assert not any(v.shape == (128, 256) for v in model.trainable_variables)
    before = task.evaluate(model)
    initial = keras.ops.convert_to_numpy(embedding.value)
    model.fit(
        task.make_dataset(0),
        steps_per_epoch=STEPS,
        epochs=1,
        verbose=0,
        shuffle=False,
    )
    after = task.evaluate(model)
    assert np.isfinite(before) and np.isfinite(after)
    assert after < before - 0.2, (before, after)  # from ln(256) = 5.55
    changed = keras.ops.convert_to_numpy(embedding.value) - initial
    assert np.all(np.isfinite(changed)) and np.abs(changed).max() > 1e-4
    assert int(optimizer.nonfinite_steps.numpy()) == 0
    return model, optimizer


def _statistics(optimizer, variable):
    """{(block origin, axis): view of its statistic} of one model variable."""
    from tests.helpers import factor_views_by_block

    index = optimizer._get_variable_index(variable)
    return {
        (origin, axis): view
        for (v, origin, axis), view in factor_views_by_block(
            optimizer, "statistics"
        ).items()
        if v == index
    }


def _kernels_3d(model):
    return [v for v in model.trainable_variables if len(v.shape) == 3]


def test_shampoo_trains_gpt2_and_preconditions_the_attention_kernels(task, mirrored):
    model, optimizer = train(
        task, mirrored, lambda: tfso.Shampoo(3e-3, precondition_frequency=STEPS // 2)
    )
    assert int(optimizer.refreshes.numpy()) == 2
    assert int(optimizer.root_failures.numpy()) == 0
    kernels = _kernels_3d(model)
    # q, k, v [128, 4, 32] and the output [4, 32, 128], in both layers; merged
    # to [128, 128], one block, a statistic per axis.
    assert len(kernels) == 8
    for kernel in kernels:
        statistics = _statistics(optimizer, kernel)
        assert sorted(statistics) == [((0, 0), 0), ((0, 0), 1)], kernel.path
        for view in statistics.values():
            value = view.numpy()
            assert value.shape == (128, 128), kernel.path
            assert np.all(np.isfinite(value)) and np.trace(value) > 0, kernel.path
    embedding = _statistics(optimizer, _token_embedding(model))
    assert embedding[(0, 0), 0].numpy().shape == (256, 256)


def test_soap_trains_gpt2(task, mirrored):
    _, optimizer = train(
        task, mirrored, lambda: tfso.SOAP(3e-3, precondition_frequency=STEPS // 2)
    )
    assert int(optimizer.refreshes.numpy()) >= 1
    assert int(optimizer.root_failures.numpy()) == 0


def test_compressed_adam_trains_gpt2(task, mirrored):
    import keras

    _, optimizer = train(
        task,
        mirrored,
        lambda: tfso.distributed(keras.optimizers.Adam(3e-3), compression="int8"),
    )
    stats = optimizer.communication_stats()
    assert 0 < stats["bytes_per_step"] < stats["float32_bytes_per_step"] / 3


def test_max_preconditioned_dim_leaves_a_large_vocabulary_out(keras_hub):
    """A 1024-row embedding with max_preconditioned_dim=512: its 4 row
    blocks keep only their hidden-axis (128) statistic; every other axis of
    the model, the 3-D kernels' included, is preconditioned."""
    model = pydoc_language_models.gpt2_language_model(context=32, vocabulary_size=1024)
    optimizer = tfso.Shampoo(max_preconditioned_dim=512)
    optimizer.build(model.trainable_variables)
    embedding = _statistics(optimizer, _token_embedding(model))
    # Rows cut into 4 blocks of 256 (the default block size), axis 1 only.
    assert sorted(embedding) == [((256 * b, 0), 1) for b in range(4)]
    assert all(view.numpy().shape == (128, 128) for view in embedding.values())
    for kernel in _kernels_3d(model):
        assert sorted(_statistics(optimizer, kernel)) == [((0, 0), 0), ((0, 0), 1)]


@pytest.mark.slow
def test_keras_hub_gpt2_example(keras_hub):
    """The example's default optimizer (Shampoo) with a vocabulary larger
    than max_preconditioned_dim; one layer and a short context, as the run is
    mostly starting and tracing (a compressed optimizer traces longer: the
    in-process test above trains one)."""
    out = run_example(
        "keras_hub_gpt2.py",
        *("--steps", "4", "--num-layers", "1", "--context", "32"),
        *("--vocabulary-size", "1024", "--max-preconditioned-dim", "512"),
    )
    assert "vocabulary 1024, shampoo" in out and "on 2 replicas" in out

    def number(after):
        return float(out.split(after)[1].split()[0])

    assert number("step 4: held-out loss") < number("step 0: held-out loss")
    assert "root failures 0" in out
