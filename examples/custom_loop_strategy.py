"""A `strategy.run` custom training loop with Shampoo or SOAP, TPU-ready.

    python examples/custom_loop_strategy.py [--optimizer soap] [--steps 200]
    python examples/custom_loop_strategy.py --tpu [grpc://ADDRESS | local]

Without `--tpu` it trains under MirroredStrategy over `--logical-cpus` logical
CPU devices (default 2), which exercises the same code path: per-replica loss
scaled by the global batch, gradients summed across replicas by Keras, the
root/basis refresh split across replicas. With `--tpu` it connects to the TPU
(an address, or "local" on a TPU VM), builds a TPUStrategy and runs the same
loop; everything it uses has an XLA kernel (checked on CPU by the tests).
Data: scikit-learn's digits, no download.
"""

import argparse
import time

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import tf_secondorder as tfso


def make_strategy(args):
    if args.tpu is not None:
        tpu = "" if args.tpu == "local" else args.tpu
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def make_optimizer(name):
    if name == "shampoo":
        return tfso.Shampoo(
            learning_rate=1e-3, precondition_frequency=20, block_size=128
        )
    return tfso.SOAP(learning_rate=3e-3, precondition_frequency=10, block_size=128)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=["shampoo", "soap"], default="shampoo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--steps-per-call", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--logical-cpus", type=int, default=2)
    parser.add_argument("--tpu", nargs="?", const="local", default=None)
    args = parser.parse_args(argv)
    if args.steps % args.steps_per_call:
        parser.error("--steps must be a multiple of --steps-per-call")

    strategy = make_strategy(args)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    # drop_remainder: static shapes, as a TPU needs.
    train = (
        tf.data.Dataset.from_tensor_slices((x[:split], y[:split]))
        .shuffle(split, seed=0)
        .repeat()
        .batch(args.batch_size, drop_remainder=True)
    )
    iterator = iter(strategy.experimental_distribute_dataset(train))

    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(256, activation="tanh"),
                keras.layers.Dense(128, activation="tanh"),
                keras.layers.Dense(10),
            ]
        )
        optimizer = make_optimizer(args.optimizer)
        optimizer.build(model.trainable_variables)
        loss_object = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None
        )

    def replica_step(batch):
        features, labels = batch
        with tf.GradientTape() as tape:
            per_example = loss_object(labels, model(features, training=True))
            # Summed over replicas by Keras, so divide by the global batch.
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=args.batch_size
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_steps(iterator):
        total = tf.constant(0.0)
        for _ in tf.range(args.steps_per_call):
            losses = strategy.run(replica_step, args=(next(iterator),))
            total += strategy.reduce("SUM", losses, axis=None)
        return total / args.steps_per_call

    start = time.perf_counter()
    for call in range(args.steps // args.steps_per_call):
        loss = float(train_steps(iterator))
        step = (call + 1) * args.steps_per_call
        if call == 0 or step % 50 == 0 or step == args.steps:
            print(f"step {step}: loss {loss:.4f}", flush=True)
    elapsed = time.perf_counter() - start
    logits = model.predict(x[split:], batch_size=256, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y[split:]))
    print(
        f"{args.optimizer} on {strategy.num_replicas_in_sync} replicas: "
        f"final loss {loss:.4f}, held-out accuracy {accuracy:.3f}, "
        f"root failures {int(optimizer.root_failures.numpy())}, {elapsed:.1f} s"
    )
    return loss, accuracy


if __name__ == "__main__":
    main()
