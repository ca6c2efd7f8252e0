"""Shared test setup: 2 logical CPU devices (for MirroredStrategy) and seeds.

Environment switches (read here, before TensorFlow initialises):

* ``TFSO_TEST_INTRA_OP_THREADS=N``: TensorFlow's intra-op thread pool gets N
  threads (``tf.config.threading.set_intra_op_parallelism_threads``) in the
  test process and in the helper scripts the tests start
  (``tests.helpers.apply_test_thread_setting``); it is also exported as
  ``TF_NUM_INTRAOP_THREADS``, which TensorFlow reads when it starts, for the
  other subprocesses (examples, the CLI). Vectorised and threaded
  kernels split work, and so round, differently with the thread count; run
  the suite with 1 and with 2 to check that no test depends on it, e.g.
  ``TFSO_TEST_INTRA_OP_THREADS=1 python -m pytest tests -q``. Unset: TF's
  default (one thread per core).
* ``TF_ENABLE_ONEDNN_OPTS=0`` / ``=1`` (TensorFlow's own switch, read when it
  is imported) changes which CPU kernels run; the suite must pass with both.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("TFSO_TEST_INTRA_OP_THREADS"):
    os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["TFSO_TEST_INTRA_OP_THREADS"]

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.helpers import apply_test_thread_setting  # noqa: E402

NUM_LOGICAL_CPUS = 2


def _configure_logical_devices():
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
        )
    except RuntimeError:
        # Already initialised (e.g. by a plugin); the check below still guards.
        pass
    found = len(tf.config.list_logical_devices("CPU"))
    assert found == NUM_LOGICAL_CPUS, f"expected 2 logical CPUs, found {found}"


apply_test_thread_setting()
_configure_logical_devices()
if os.environ.get("TFSO_TEST_INTRA_OP_THREADS"):
    # The setting only takes effect before TensorFlow's context starts.
    assert tf.config.threading.get_intra_op_parallelism_threads() == int(
        os.environ["TFSO_TEST_INTRA_OP_THREADS"]
    )


@pytest.fixture(autouse=True)
def seeded():
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over the 2 logical CPU devices, for the whole session.

    Strategies over the same devices share collective group keys and restart
    their instance keys, so a second strategy in the process can reuse an
    instance key with another dtype ("Collective instance 100 expected ...
    data_type 1 but got ... 19"). One strategy keeps the keys increasing.
    """
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir with the offline datasets built once per test process
    (`sklearn_digits`, `pydoc_topics`; nothing downloaded)."""
    pytest.importorskip("tensorflow_datasets")
    from tf_secondorder.bench import tfds_builders

    path = tmp_path_factory.mktemp("tfds")
    tfds_builders.prepare(str(path))
    return str(path)
