"""Bytes per replica per step: all_gather of codes vs bidirectional compression.

    python tools/bidirectional_bytes.py                 # 2, 4 and 8 replicas
    python tools/bidirectional_bytes.py --replicas 4 --width 512

For each replica count a child process sets up that many logical CPUs and a
MirroredStrategy, builds a `--width`² dense layer (plus bias), and trains
two steps with `tfso.distributed(SGD)` for each setting. Printed, per
replica per step: bytes handed to collectives (`bytes_per_step`) and bytes
the collectives deliver to the replica (`bytes_received_per_step`), and the
received bytes as a ratio to uncompressed float32 in the same process.
"""

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "fp32 all-reduce": {},
    "sign, all_gather": {"compression": "sign"},
    "sign, bidirectional": {"compression": "sign", "aggregation": "bidirectional"},
    "scaled_sign, all_gather": {"compression": "scaled_sign"},
    "scaled_sign, bidirectional": {
        "compression": "scaled_sign",
        "aggregation": "bidirectional",
    },
    "qsgd 4-bit, all_gather": {"compression": {"name": "qsgd", "bits": 4}},
    "qsgd 4-bit, bidirectional": {
        "compression": {"name": "qsgd", "bits": 4},
        "aggregation": "bidirectional",
    },
}


def child(replicas, width):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas
    )
    import keras
    import numpy as np

    import tf_secondorder as tfso
    from tf_secondorder.distribute import quantizers

    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")]
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 * replicas, width)).astype("float32")
    for label, options in SETTINGS.items():
        options = dict(options)
        if isinstance(options.get("compression"), dict):
            spec = dict(options["compression"])
            spec.pop("name")
            options["compression"] = quantizers.QSGD(**spec)
        with strategy.scope():
            model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width)])
            optimizer = tfso.distributed(keras.optimizers.SGD(0.01), **options)
            model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, x, batch_size=8 * replicas, epochs=1, verbose=0)
        stats = optimizer.communication_stats()
        print(
            json.dumps(
                {
                    "replicas": replicas,
                    "setting": label,
                    "parameters": width * width + width,
                    "bytes_per_step": stats["bytes_per_step"],
                    "bytes_received_per_step": stats["bytes_received_per_step"],
                }
            ),
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.replicas[0], args.width)
    rows = []
    for replicas in args.replicas:
        command = [sys.executable, __file__, "--child", "--replicas", str(replicas)]
        command += ["--width", str(args.width)]
        output = subprocess.run(command, capture_output=True, text=True, check=True)
        group = [json.loads(x) for x in output.stdout.splitlines() if x.startswith("{")]
        base = group[0]["bytes_received_per_step"]
        print(f"\n{replicas} replicas, {group[0]['parameters']} parameters")
        print(f"{'setting':<28} {'sent':>11} {'received':>11} {'ratio':>7}")
        for row in group:
            row["received_ratio"] = row["bytes_received_per_step"] / base
            print(
                f"{row['setting']:<28} {row['bytes_per_step']:>11} "
                f"{row['bytes_received_per_step']:>11} {row['received_ratio']:>7.4f}"
            )
        rows += group
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
