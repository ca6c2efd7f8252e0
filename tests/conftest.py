"""Shared test setup: 2 logical CPU devices (for MirroredStrategy) and seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

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


_configure_logical_devices()


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
