"""Trains the same model with split and unsplit root refreshes on N logical CPUs.

    python -m tests.optimizers.split_roots_run N OUT.npz [root_method [split,unsplit]]

(from the repository root). Writes what `collect` returns, for tests that
need more logical devices than the test process has.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.helpers import (  # noqa: E402
    apply_test_thread_setting,
    replica_values,
    shampoo_factor_pairs,
)

# Block size 16 over layers 16→24→8 gives 14 factors: sizes 16 and 8 with
# p = 4 (kernels) and p = 2 (biases), so shares mix sizes and groups are
# split between replicas; 4 (size, p) groups keep tracing (and XLA
# compiling, for coupled Newton) short.
LAYERS = (16, 24, 8)
BLOCK_SIZE = 16
EPSILON = 1e-4
# Refreshes at steps 3 and 6. Steps 1-2 precondition nothing, so up to the
# first refresh a split and an unsplit run execute the same ops; the last
# step is a refresh, so the final roots are those of the final statistics.
FIRST_REFRESH = 3
STEPS = 6


def _data(dtype="float32"):
    # Drawn in float32 and widened: a float64 run sees the same numbers.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, LAYERS[0])).astype("float32")
    y = rng.normal(size=(64, LAYERS[-1])).astype("float32")
    return x.astype(dtype), y.astype(dtype)


def _model(dtype):
    def build(dtype):
        return keras.Sequential(
            [keras.Input((LAYERS[0],), dtype=dtype)]
            + [
                keras.layers.Dense(n, activation="tanh", dtype=dtype)
                for n in LAYERS[1:-1]
            ]
            + [keras.layers.Dense(LAYERS[-1], dtype=dtype)]
        )

    keras.utils.set_random_seed(0)
    model = build("float32")
    if dtype != "float32":
        # The float32 initial weights, widened exactly.
        weights = model.get_weights()
        model = build(dtype)
        model.set_weights([w.astype(dtype) for w in weights])
    return model


def _optimizer(distribute_roots, root_method, shares):
    import tf_secondorder as tfso

    class Recording(tfso.Shampoo):
        """Records (at trace time) the factors each `refresh` call computes."""

        def refresh(self, items, *args):
            # Items are row ranges (slot, begin, end) of the stacked state;
            # recorded as the factors they cover.
            shares.append(
                [
                    f.index
                    for slot, begin, end in items
                    for f in self._layout.factors
                    if f.slot == slot and begin <= f.row < end
                ]
            )
            return super().refresh(items, *args)

    return Recording(
        learning_rate=0.01,
        block_size=BLOCK_SIZE,
        precondition_frequency=FIRST_REFRESH,
        epsilon=EPSILON,
        root_method=root_method,
        distribute_roots=distribute_roots,
        root_refresh="in_step",
    )


def _snapshot(model, optimizer, pairs):
    """Every weight and optimizer variable, keyed by kind and position (layer
    names differ between runs), plus the replicas that disagree."""
    arrays, mismatched, counts = {}, [], []
    for j, (stat, root, p) in enumerate(pairs):
        arrays[f"factor/{j:03d}/statistics"] = np.asarray(stat.numpy())
        arrays[f"factor/{j:03d}/root"] = np.asarray(root.numpy())
        arrays[f"factor/{j:03d}/p"] = np.array(p)
    factor_paths = {v.variable.path for stat, root, _ in pairs for v in (stat, root)}
    others = [v for v in optimizer.variables if v.path not in factor_paths]
    for kind, variables in (("weight", model.weights), ("state", others)):
        for i, v in enumerate(variables):
            name = "accumulator" if "grafting_accumulator" in v.path else "other"
            arrays[f"{kind}/{i:03d}/{name}"] = np.asarray(v.numpy(), np.float64)
    for v in list(model.weights) + list(optimizer.variables):
        values = replica_values(v)
        counts.append(len(values))
        if any(not np.array_equal(values[0], other) for other in values[1:]):
            mismatched.append(v.path)
    arrays["replicas_disagree"] = np.array(mismatched or [""])
    arrays["replica_counts"] = np.array(counts)
    return arrays


def train(strategy, distribute_roots, root_method="eigh", dtype="float32"):
    """(snapshot after the first refresh, snapshot at the end, shares)."""
    x, y = _data(dtype)
    shares, snapshots = [], {}
    scope = strategy.scope() if strategy is not None else _null_scope()
    with scope:
        model = _model(dtype)
        optimizer = _optimizer(distribute_roots, root_method, shares)
        model.compile(optimizer=optimizer, loss="mse")
    # Built by the first batch; the callback then reads it after step 3.
    pairs = []

    class AfterFirstRefresh(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(optimizer.iterations.numpy()) == FIRST_REFRESH:
                pairs.extend(shampoo_factor_pairs(model, optimizer, BLOCK_SIZE))
                snapshots["first"] = _snapshot(model, optimizer, pairs)

    model.fit(
        x,
        y,
        batch_size=64,
        epochs=STEPS,
        verbose=0,
        shuffle=False,
        callbacks=[AfterFirstRefresh()],
    )
    snapshots["end"] = _snapshot(model, optimizer, pairs)
    return snapshots, shares, int(optimizer.root_failures.numpy())


class _null_scope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def collect(strategy, root_method="eigh", labels=("split", "unsplit")):
    """Arrays of a split and an unsplit run (or those in `labels`) under
    `strategy`: `<split|unsplit>/<first|end>/...` (see `_snapshot`), the
    shares each `refresh` call computed (recorded when traced) and the root
    failures."""
    arrays = {}
    for label in labels:
        mode = {"split": True, "unsplit": False}[label]
        snapshots, shares, failures = train(strategy, mode, root_method)
        for stage, values in snapshots.items():
            for key, value in values.items():
                arrays[f"{label}/{stage}/{key}"] = value
        arrays[f"{label}/shares"] = np.array(
            [i for share in shares for i in share] or [-1]
        )
        arrays[f"{label}/share_count"] = np.array(len(shares))
        arrays[f"{label}/root_failures"] = np.array(failures)
    return arrays


def main():
    count, out = int(sys.argv[1]), sys.argv[2]
    root_method = sys.argv[3] if len(sys.argv) > 3 else "eigh"
    labels = sys.argv[4].split(",") if len(sys.argv) > 4 else ("split", "unsplit")
    apply_test_thread_setting()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    np.savez(out, **collect(strategy, root_method, labels))


if __name__ == "__main__":
    main()
