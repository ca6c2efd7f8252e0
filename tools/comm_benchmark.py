"""Bytes per replica per step and digits-ae final loss for every compressor, 2 replicas.

    python tools/comm_benchmark.py                      # both tables
    python tools/comm_benchmark.py --skip-t1            # bytes only (~1 min)
    python tools/comm_benchmark.py --t1-steps 500

Bytes are read from `optimizer.communication_stats()` after real steps under
MirroredStrategy on 2 logical CPUs (the tensors handed to collectives), on an
MLP 784-1024-512-10 (1.33 M parameters); the baseline is uncompressed float32
measured in the same run. digits-ae (the bench's default task) runs Adam(3e-3)
through `tfso.distributed` at 2 replicas (global batch 128) for each
compressor, plus `tfso.SignSGD` (majority vote).
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_secondorder as tfso  # noqa: E402
from tf_secondorder.bench.tasks import get_task  # noqa: E402

C = tfso.compression
SETTINGS = [
    ("float32 (none)", lambda: None, {}),
    ("fp16", lambda: "fp16", {}),
    ("bf16", lambda: "bf16", {}),
    ("sign + EF", lambda: "sign", {}),
    ("sign, majority vote", lambda: "sign", {"aggregation": "majority_vote"}),
    ("scaled_sign + EF", lambda: "scaled_sign", {}),
    ("qsgd 8-bit", lambda: "qsgd", {}),
    ("qsgd 4-bit", lambda: C.QSGD(bits=4), {}),
    ("terngrad", lambda: "terngrad", {}),
    ("natural", lambda: "natural", {}),
    ("natural dithering s=4", lambda: C.Natural(levels=4), {}),
    ("topk 1% + EF", lambda: "topk", {}),
    ("randomk 1%", lambda: "randomk", {}),
    ("powersgd rank 4 + EF", lambda: "powersgd", {}),
]


def strategy():
    return tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")]
    )


def bytes_table(mirrored):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 784)).astype("float32")
    y = rng.integers(0, 10, 256)
    rows = []
    for label, compression, options in SETTINGS:
        with mirrored.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [
                    keras.Input((784,)),
                    keras.layers.Dense(1024, activation="relu"),
                    keras.layers.Dense(512, activation="relu"),
                    keras.layers.Dense(10),
                ]
            )
            optimizer = tfso.distributed(
                keras.optimizers.SGD(0.01), compression=compression(), **options
            )
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        model.fit(x, y, batch_size=128, epochs=1, verbose=0)
        stats = optimizer.communication_stats()
        rows.append(
            {
                "setting": label,
                "parameters": int(
                    sum(np.prod(w.shape) for w in model.trainable_weights)
                ),
                "bytes_per_step": stats["bytes_per_step"],
                "rounds_per_step": stats["rounds"] // 2,
            }
        )
    baseline = rows[0]["bytes_per_step"]
    for row in rows:
        row["vs_float32"] = row["bytes_per_step"] / baseline
    return rows


def t1_table(mirrored, steps, only=None):
    task = get_task("digits-ae", steps=steps)
    rows = []
    settings = SETTINGS + [("SignSGD, majority vote (lr 1e-4)", None, {})]
    for label, compression, options in settings:
        if only and label not in only and label != settings[0][0]:
            continue
        with mirrored.scope():
            model = task.make_model(0)
            if compression is None:
                optimizer = tfso.SignSGD(1e-4)
            else:
                optimizer = tfso.distributed(
                    keras.optimizers.Adam(3e-3), compression=compression(), **options
                )
            model.compile(optimizer=optimizer, loss=task.loss)
        start = time.perf_counter()
        model.fit(task.make_dataset(0), steps_per_epoch=steps, epochs=1, verbose=0)
        seconds = time.perf_counter() - start
        stats = optimizer.communication_stats()
        rows.append(
            {
                "setting": label,
                "final_loss": task.evaluate(model),
                "bytes_per_step": stats["bytes_per_step"],
                "seconds": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    baseline = rows[0]["final_loss"]
    for row in rows:
        row["loss_vs_float32"] = row["final_loss"] / baseline
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-t1", action="store_true")
    parser.add_argument("--t1-steps", type=int, default=2000)
    parser.add_argument("--out", default="comm_results.json")
    parser.add_argument(
        "--only", default=None, help="digits-ae settings to run, labels separated by |"
    )
    args = parser.parse_args(argv)
    mirrored = strategy()
    results = {"bytes": bytes_table(mirrored)}
    print("| setting | bytes/replica/step | vs float32 | collective calls/step |")
    print("|---|---|---|---|")
    for row in results["bytes"]:
        print(
            f"| {row['setting']} | {row['bytes_per_step']:,} | {row['vs_float32']:.4f} "
            f"(1/{1 / row['vs_float32']:.1f}) | {row['rounds_per_step']} |"
        )
    if not args.skip_t1:
        only = args.only.split("|") if args.only else None
        results["t1"] = t1_table(mirrored, args.t1_steps, only)
        print(f"\nT1 digits-ae, {args.t1_steps} steps, 2 replicas")
        print("| setting | final MSE | vs float32 | bytes/replica/step | wall s |")
        print("|---|---|---|---|---|")
        for row in results["t1"]:
            print(
                f"| {row['setting']} | {row['final_loss']:.5f} | {row['loss_vs_float32']:.2f}× "
                f"| {row['bytes_per_step']:,} | {row['seconds']:.0f} |"
            )
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
