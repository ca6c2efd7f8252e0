"""Local SGD on digits-ae: communication rounds and final loss against synchronous.

    python tools/local_sgd_benchmark.py                      # 2 and 4 replicas
    python tools/local_sgd_benchmark.py --replicas 2 --every 8 --steps 400

For each replica count R a child process sets up R logical CPU devices and a
MirroredStrategy, and trains digits-ae (the digits autoencoder, global batch 128,
`--steps` steps) with `tfso.distributed(Adam(lr))`: synchronously, then with
`average_every=I` for each I, averaging weights and optimizer state (the
default), and with `--slots-off`, weights only. Printed: rounds of
communication (`communication_stats()["rounds"]`), their ratio to
synchronous, the final full-data MSE and its ratio to synchronous, all from
the same process.
"""

import argparse
import json
import os
import subprocess
import sys


def child(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * args.replicas
    )
    import keras

    import tf_secondorder as tfso
    from tf_secondorder.bench.tasks.digits_ae import digits_autoencoder

    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")]
    )
    task = digits_autoencoder(steps=args.steps)
    epochs = args.steps // args.steps_per_epoch
    configs = [("sync", None, True)]
    configs += [(f"I={i}", i, True) for i in args.every]
    configs += [(f"I={i} weights only", i, False) for i in args.slots_off]
    for label, every, slots in configs:
        with strategy.scope():
            model = task.make_model(args.seed)
            optimizer = tfso.distributed(
                keras.optimizers.Adam(args.lr), average_every=every
            )
            if not slots:
                # The measured alternative: average the weights only.
                optimizer.averaged_variables = lambda o=optimizer: list(
                    o._trainable_variables
                )
            model.compile(optimizer=optimizer, loss=task.loss)
        model.fit(
            task.make_dataset(args.seed),
            epochs=epochs,
            steps_per_epoch=args.steps_per_epoch,
            verbose=0,
        )
        stats = optimizer.communication_stats()
        row = {
            "replicas": args.replicas,
            "config": label,
            "average_every": every,
            "average_optimizer_state": slots,
            "steps": epochs * args.steps_per_epoch,
            "rounds": stats["rounds"],
            "bytes_total": stats["bytes_total"],
            "final_loss": task.evaluate(model),
        }
        print(json.dumps(row), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--every", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--slots-off", type=int, nargs="*", default=[8])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--steps-per-epoch", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.replicas = args.replicas[0]
        return child(args)
    rows = []
    for replicas in args.replicas:
        command = [sys.executable, __file__, "--child", "--replicas", str(replicas)]
        command += ["--every", *map(str, args.every), "--slots-off"]
        command += [*map(str, args.slots_off), "--steps", str(args.steps)]
        command += ["--steps-per-epoch", str(args.steps_per_epoch)]
        command += ["--lr", str(args.lr), "--seed", str(args.seed)]
        output = subprocess.run(command, capture_output=True, text=True, check=True)
        group = [json.loads(x) for x in output.stdout.splitlines() if x.startswith("{")]
        sync = group[0]
        print(f"\n{replicas} replicas, {sync['steps']} steps, Adam lr {args.lr}")
        print(
            f"{'config':<20} {'rounds':>7} {'ratio':>7} {'final loss':>11} {'ratio':>7}"
        )
        for row in group:
            row["rounds_ratio"] = row["rounds"] / sync["rounds"]
            row["loss_ratio"] = row["final_loss"] / sync["final_loss"]
            print(
                f"{row['config']:<20} {row['rounds']:>7} {row['rounds_ratio']:>7.3f} "
                f"{row['final_loss']:>11.5f} {row['loss_ratio']:>7.3f}"
            )
        rows += group
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
