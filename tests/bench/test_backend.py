"""tf_secondorder on Keras's own terms: backend check and optimizer names."""

import json
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _import_with(env_changes):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(env_changes, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-c", "import tf_secondorder"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_import_under_another_backend_fails_at_once(backend):
    done = _import_with({"KERAS_BACKEND": backend})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    # Our message, not Keras's (JAX and PyTorch need not be installed).
    assert last.startswith("ImportError: tf_secondorder needs Keras's TensorFlow")
    assert f"'{backend}' backend by the KERAS_BACKEND environment variable" in last
    assert "Set KERAS_BACKEND=tensorflow" in last


def test_backend_from_the_keras_config_file(tmp_path):
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    done = _import_with({"KERAS_HOME": str(tmp_path)})
    assert done.returncode != 0
    assert "'jax' backend by the Keras config file" in done.stderr


def test_keras_backend_variable_wins_over_the_config_file(tmp_path, monkeypatch):
    from tf_secondorder import _backend

    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    monkeypatch.delitem(sys.modules, "keras")  # as before Keras is imported
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    assert _backend.configured_backend()[0] == "tensorflow"
    monkeypatch.delenv("KERAS_BACKEND")
    assert _backend.configured_backend()[0] == "jax"
    with pytest.raises(ImportError, match="TensorFlow backend"):
        _backend.check()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "absent"))
    assert _backend.configured_backend() == ("tensorflow", "Keras's default")


def test_the_check_reads_an_imported_keras():
    from tf_secondorder import _backend

    assert _backend.configured_backend() == ("tensorflow", "the imported Keras")
    _backend.check()  # no error on TensorFlow


@pytest.mark.parametrize("name", ["SOAP", "Shampoo", "SignSGD"])
def test_keras_optimizers_get_by_registered_name(name):
    import tf_secondorder as tfso

    optimizer = keras.optimizers.get(f"tf_secondorder>{name}")
    assert isinstance(optimizer, getattr(tfso, name))
