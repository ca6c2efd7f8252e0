"""CR-PSGD growing batches against a fixed batch on digits-ae, at equal samples.

    python tools/growing_batch_benchmark.py
    python tools/growing_batch_benchmark.py --budget 64000 --growth 1.05

Trains digits-ae (the digits autoencoder) under a MirroredStrategy over
`--replicas` logical CPUs with `tfso.distributed(Adam(lr))`:

- fixed: batches of `--batch-size` until `--budget` examples;
- CR-PSGD: `GrowingBatchSchedule(B₁=--initial, ρ=--growth, T=--budget)` for
  each ρ, trained with `train_in_micro_batches` (`--micro` examples per
  replica per micro-batch, so memory stays that of a small batch);
- with `--scale-lr`, also CR-PSGD whose learning rate grows as
  lr·√(B_t/B₁), capped at `--max-lr-scale`·lr.

`--task logistic` trains softmax regression on the digits labels instead
(convex, the setting of CR-PSGD's guarantee; final loss = full-data
cross-entropy).

Printed: rounds (`communication_stats()["rounds"]`), final full-data MSE,
both as ratios to the fixed batch of the same run.
"""

import argparse
import json
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--budget", type=int, default=256000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--initial", type=int, default=128)
    parser.add_argument("--growth", type=float, nargs="+", default=[1.02, 1.05])
    parser.add_argument("--micro", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--scale-lr", action="store_true")
    parser.add_argument("--max-lr-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--task", choices=["digits-ae", "logistic"], default="digits-ae"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * args.replicas
    )
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import tf_secondorder as tfso
    from tf_secondorder.bench.tasks import digits_autoencoder

    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")]
    )
    task = digits_autoencoder()
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    targets = x
    if args.task == "logistic":
        targets = digits.target.astype("int32")

        def make_model(seed):
            keras.utils.set_random_seed(seed)
            return keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])

        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def evaluate(model):
            return float(loss_fn(targets, model(x, training=False)))

        task.make_model, task.loss, task.evaluate = make_model, loss_fn, evaluate

    class SqrtScaled(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, sizes):
            self.sizes = [int(s) for s in sizes]
            scale = np.minimum(np.sqrt(np.asarray(sizes) / sizes[0]), args.max_lr_scale)
            self.rates = tf.constant(args.lr * scale, tf.float32)

        def get_config(self):
            return {"sizes": self.sizes}

        def __call__(self, step):
            index = tf.minimum(tf.cast(step, tf.int32), tf.size(self.rates) - 1)
            return tf.gather(self.rates, index)

    def run(label, schedule, scaled=False):
        examples = tf.data.Dataset.from_tensor_slices((x, targets)).shuffle(
            len(x), seed=args.seed, reshuffle_each_iteration=True
        )
        data = tfso.data.growing_batches(examples, schedule)
        lr = SqrtScaled(schedule.batch_sizes()) if scaled else args.lr
        with strategy.scope():
            model = task.make_model(args.seed)
            optimizer = tfso.distributed(keras.optimizers.Adam(lr))
            model.compile(optimizer=optimizer, loss=task.loss)
        if schedule.growth_factor > 1.0 + 1e-9 and args.micro:
            tfso.data.train_in_micro_batches(model, args.micro)
        model.fit(data, epochs=1, verbose=0)
        sizes = schedule.batch_sizes()
        return {
            "config": label,
            "rounds": optimizer.communication_stats()["rounds"],
            "samples": int(sum(sizes)),
            "largest_batch": int(max(sizes)),
            "final_loss": task.evaluate(model),
        }

    # A fixed batch is the schedule with (almost) no growth, capped at B.
    fixed = tfso.data.GrowingBatchSchedule(
        args.batch_size,
        1.0 + 1e-12,
        args.budget,
        max_batch_size=args.batch_size,
        multiple_of=args.replicas,
    )
    rows = [run(f"fixed {args.batch_size}", fixed)]
    for growth in args.growth:
        schedule = tfso.data.GrowingBatchSchedule(
            args.initial, growth, args.budget, multiple_of=args.replicas
        )
        rows.append(run(f"CR-PSGD rho={growth}", schedule))
        if args.scale_lr:
            rows.append(run(f"CR-PSGD rho={growth}, sqrt lr", schedule, scaled=True))
    base = rows[0]
    print(
        f"\n{args.task}, {args.replicas} replicas, {args.budget} samples, "
        f"Adam lr {args.lr}"
    )
    print(
        f"{'config':<28} {'rounds':>7} {'ratio':>7} {'max B':>6} {'loss':>9} {'ratio':>7}"
    )
    for row in rows:
        row["rounds_ratio"] = row["rounds"] / base["rounds"]
        row["loss_ratio"] = row["final_loss"] / base["final_loss"]
        print(
            f"{row['config']:<28} {row['rounds']:>7} {row['rounds_ratio']:>7.3f} "
            f"{row['largest_batch']:>6} {row['final_loss']:>9.5f} {row['loss_ratio']:>7.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
