import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir with the offline datasets built once per test process
    (`sklearn_digits`, `pydoc_topics`; nothing downloaded)."""
    pytest.importorskip("tensorflow_datasets")
    from tf_secondorder.bench import tfds_builders

    path = tmp_path_factory.mktemp("tfds")
    tfds_builders.prepare(str(path))
    return str(path)
