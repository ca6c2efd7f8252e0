"""Trains the same model with split and unsplit root refreshes on N logical CPUs.

    python split_roots_run.py N OUT.npz [root_method]

Writes every optimizer variable and weight of both runs and the shares each
replica computed (recorded at trace time), for tests that need more logical
devices than the test process has.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# Block size 16 over layers 20→24→40→5 gives factors of sizes 16, 8, 5 and 4,
# so shares mix sizes and some groups are split between replicas.
LAYERS = (20, 24, 40, 5)


def train(strategy, distribute_roots, root_method="eigh", steps=7):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, LAYERS[0])).astype("float32")
    y = rng.normal(size=(64, LAYERS[-1])).astype("float32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((LAYERS[0],))]
            + [keras.layers.Dense(n, activation="tanh") for n in LAYERS[1:-1]]
            + [keras.layers.Dense(LAYERS[-1])]
        )
        import tf_secondorder as tfso

        optimizer = tfso.Shampoo(
            learning_rate=0.01,
            block_size=16,
            precondition_frequency=3,
            epsilon=1e-4,
            root_method=root_method,
            distribute_roots=distribute_roots,
        )
        model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=64, epochs=steps, verbose=0, shuffle=False)
    return model, optimizer


def collect(strategy, root_method="eigh"):
    """Arrays of a split and an unsplit run under `strategy`, with the shares."""
    import tf_secondorder as tfso

    shares = []
    original = tfso.Shampoo.refresh_matrices

    def recording(self, factor_indices):
        shares.append(list(factor_indices))
        return original(self, factor_indices)

    arrays = {}
    tfso.Shampoo.refresh_matrices = recording
    try:
        for label, mode in (("split", True), ("unsplit", False)):
            shares.clear()
            model, optimizer = train(strategy, mode, root_method)
            for i, v in enumerate(list(model.weights) + list(optimizer.variables)):
                # Keyed by index and kind: layer names differ between runs.
                kind = "preconditioner" if "preconditioner" in v.path else "other"
                arrays[f"{label}/{i:03d}/{kind}"] = np.asarray(v.numpy(), np.float64)
            arrays[f"{label}/shares"] = np.array(
                [i for share in shares for i in share] or [-1]
            )
            arrays[f"{label}/share_count"] = np.array(len(shares))
    finally:
        tfso.Shampoo.refresh_matrices = original
    return arrays


def main():
    count, out = int(sys.argv[1]), sys.argv[2]
    root_method = sys.argv[3] if len(sys.argv) > 3 else "eigh"
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    np.savez(out, **collect(strategy, root_method))


if __name__ == "__main__":
    main()
