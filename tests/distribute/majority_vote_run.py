"""Majority votes and SignSGD training on N logical CPUs, for test_majority_vote.

    python -m tests.distribute.majority_vote_run N OUT.npz [byzantine|no_all_to_all]

(from the repository root). Writes what `collect` (with `byzantine`:
`collect_byzantine`; with `no_all_to_all`: `collect_votes` under a
MirroredStrategy whose cross-device ops have no all_to_all kernel) returns,
for tests that need more logical devices, or another strategy, than the test
process has; the test process calls `collect` itself on its 2 replicas.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.helpers import (  # noqa: E402
    apply_test_thread_setting,
    regression_data,
    replica_values,
    weights_of,
)

# 143 elements in 7 words of signs: tensors that end inside a word, and shards
# (of 4, 2 or 1 words at 2, 4 or 8 replicas) that cross tensors.
SHAPES = [(37,), (4, 9), (70,)]
CODECS = ("sign", "scaled_sign", "scaled_sign32")
PATHS = ("gather", "sharded", "auto")
# The replica that negates what it sends in `collect_byzantine`.
ADVERSARY = 4


def vote_inputs(n, seed=0):
    """[n, 143] float32: replica r's tensors, flat. Exact zeros (sign(0) = +1);
    the first 16 elements cancel in pairs of replicas (ties of the vote at
    even n); replica 0's second tensor is all 0 and replica n−1's first 32
    elements are 0, so a scaled sign's zero scale abstains there."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, sum(int(np.prod(s)) for s in SHAPES))).astype("float32")
    x[:, 20] = 0.0
    for r in range(0, n - 1, 2):
        x[r + 1, :16] = -x[r, :16]
    x[0, 37:73] = 0.0
    x[n - 1, :32] = 0.0
    return x


def _codec(name):
    import tf_secondorder as tfso

    if name == "scaled_sign32":
        return tfso.compression.ScaledSign(bucket_size=32)
    return tfso.compression.get(name)


def run_vote(strategy, codec, path, inputs):
    """One `MajorityVote.reduce` with replica r holding inputs[r]: returns the
    [n, 143] aggregates of every replica, the channel's counts and the path
    taken."""
    from tf_secondorder.distribute.channel import Channel
    from tf_secondorder.distribute.voting import MajorityVote

    aggregator = MajorityVote(_codec(codec), path=path)
    sizes = [int(np.prod(s)) for s in SHAPES]
    table = tf.constant(inputs)
    counts = {}

    @tf.function
    def step():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            flat = table[context.replica_id_in_sync_group]
            xs = [tf.reshape(p, s) for p, s in zip(tf.split(flat, sizes), SHAPES)]
            channel = Channel(context, tf.constant(True))
            aggregates, _ = aggregator.reduce(
                channel, xs, list(range(len(xs))), tf.constant(0, tf.int64)
            )
            counts.update(
                bytes=channel.bytes, received=channel.received, rounds=channel.rounds
            )
            return tf.concat([tf.reshape(a, [-1]) for a in aggregates], 0)

        return strategy.run(replica_fn)

    out = np.stack([v.numpy() for v in strategy.experimental_local_results(step())])
    return out, counts, aggregator.traced_path


def _data():
    x, y = regression_data(320)
    return x, y


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )


def fit(strategy, path=None, optimizer_class=None, epochs=4, momentum=0.0):
    """SignSGD (majority vote) in model.fit; `path` forces the vote's protocol.
    Returns (initial loss, final loss, weights, optimizer)."""
    import tf_secondorder as tfso

    x, y = _data()
    with strategy.scope():
        model = _model()
        optimizer = (optimizer_class or tfso.SignSGD)(3e-3, momentum=momentum)
        model.compile(optimizer=optimizer, loss="mse")
        optimizer.build(model.trainable_variables)
    if path is not None:
        optimizer.communicator.aggregator.path = path
    initial = model.evaluate(x, y, batch_size=40, verbose=0)
    model.fit(x, y, batch_size=40, epochs=epochs, shuffle=False, verbose=0)
    final = model.evaluate(x, y, batch_size=40, verbose=0)
    return initial, final, model, optimizer


def _fit_arrays(strategy, label, path):
    initial, final, model, optimizer = fit(strategy, path)
    stats = optimizer.communication_stats()
    arrays = {
        f"{label}/loss": np.array([initial, final]),
        f"{label}/bytes": np.array(stats["bytes_per_step"]),
        f"{label}/received": np.array(stats["bytes_received_per_step"]),
        f"{label}/rounds": np.array(stats["rounds"]),
        f"{label}/path": np.array(optimizer.communicator.aggregator.traced_path),
        f"{label}/parameters": np.array(
            sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        ),
    }
    for i, (weight, variable) in enumerate(zip(weights_of(model), model.weights)):
        arrays[f"{label}/weight{i}"] = weight
        replicas = replica_values(variable)
        arrays[f"{label}/replicas_agree{i}"] = np.array(
            all(np.array_equal(replicas[0], r) for r in replicas)
        )
    return arrays


def collect_votes(strategy, codecs=CODECS):
    n = strategy.num_replicas_in_sync
    inputs = vote_inputs(n)
    arrays = {"inputs": inputs, "replicas": np.array(n)}
    for codec in codecs:
        for path in PATHS:
            out, counts, taken = run_vote(strategy, codec, path, inputs)
            key = f"{codec}/{path}"
            arrays[f"{key}/aggregates"] = out
            arrays[f"{key}/path"] = np.array(taken)
            for name, value in counts.items():
                arrays[f"{key}/{name}"] = np.array(value)
    return arrays


def collect(strategy, with_fit=True):
    arrays = collect_votes(strategy)
    if with_fit:
        for label, path in (("fit_auto", None), ("fit_gather", "gather")):
            arrays.update(_fit_arrays(strategy, label, path))
    return arrays


def byzantine_optimizer():
    import tf_secondorder as tfso

    class Byzantine(tfso.SignSGD):
        """Replica ADVERSARY sends the negation of what an honest replica
        sends (a test-only local transform, after Signum's momentum)."""

        def local_transform(self):
            honest = super().local_transform()

            def transform(gradients, keys):
                sent, updates = honest(gradients, keys) if honest else (gradients, [])
                context = tf.distribute.get_replica_context()
                adversary = tf.equal(context.replica_id_in_sync_group, ADVERSARY)
                flip = tf.where(adversary, -1.0, 1.0)
                return [flip * s for s in sent], updates

            return transform

    return Byzantine


def collect_byzantine(strategy):
    """All-honest and one-adversary SignSGD (5 replicas), and one vote with the
    adversary's signs negated."""
    arrays = {}
    for label, cls in (("honest", None), ("byzantine", byzantine_optimizer())):
        initial, final, model, _ = fit(strategy, None, cls, epochs=6, momentum=0.9)
        arrays[f"{label}/loss"] = np.array([initial, final])
    inputs = vote_inputs(strategy.num_replicas_in_sync, seed=1)
    attacked = inputs.copy()
    attacked[ADVERSARY] = -np.where(inputs[ADVERSARY] < 0, -1.0, 1.0)
    arrays["vote_inputs"] = inputs
    arrays["attacked_vote"], _, _ = run_vote(strategy, "sign", "auto", attacked)
    return arrays


def main():
    count, out = int(sys.argv[1]), sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "collect"
    apply_test_thread_setting()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if mode == "no_all_to_all":
        # Not TF's collective ops: no launchers, so no all_to_all kernel.
        strategy = tf.distribute.MirroredStrategy(
            devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
        arrays = collect_votes(strategy, ("sign", "scaled_sign32"))
    else:
        strategy = tf.distribute.MirroredStrategy(devices)
        if mode == "byzantine":
            arrays = collect_byzantine(strategy)
        else:
            # `fit` on 8 logical devices of a 2-core machine takes minutes;
            # the votes and their bytes are checked there, `fit` up to 4.
            arrays = collect(strategy, with_fit=count <= 4)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
