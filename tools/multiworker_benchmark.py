"""Multi-worker step time and time-to-target over a rate-limited network.

    python tools/multiworker_benchmark.py                       # full grid
    python tools/multiworker_benchmark.py --workers 2 --rates 1gbit \
        --settings fp32,sign --steps 40

For every (workers, rate) it launches real worker processes with
`tf-secondorder launch --rate` (a private network namespace whose loopback is
shaped by tc; needs root) and trains a communication-bound model, a
64-2048-2048-2048-10 MLP (8.5 M parameters) on scikit-learn digits at 8
examples per worker per step (`--batch-per-worker`), with `tfso.distributed(Adam)` and each
compression setting. Worker 0 records the wall time of every step and the
mean training loss of every 10-step window. Printed ratios are against
uncompressed float32 measured in the same (workers, rate) group.

Time-to-target counts from the start of `fit` (tracing and the first
steps included) to the end of the first 10-step window whose mean loss is
at or below `--target`. Runs whose time-to-target is longer than
`--max-seconds` stop there; their time-to-target is then "> max-seconds".
"""

import argparse
import json
import os
import sys
import time

SETTINGS = {
    "fp32": {},
    "fp16": {"compression": "fp16"},
    "bf16": {"compression": "bf16"},
    "sign": {"compression": "sign"},
    "scaled_sign": {"compression": "scaled_sign"},
    "int8": {"compression": "int8"},
    "qsgd": {"compression": "qsgd"},
    "qsgd4": {"compression": {"name": "qsgd", "bits": 4}},
    "terngrad": {"compression": "terngrad"},
    "natural": {"compression": "natural"},
    "topk": {"compression": "topk"},
    "randomk": {"compression": "randomk"},
    "powersgd": {"compression": "powersgd"},
    # tfso.SignSGD (Signum, momentum 0.9): majority vote, and the same
    # optimizer with an uncompressed float32 all-reduce of the momenta.
    "signum_vote": {"optimizer": "signsgd"},
    "signum_fp32": {"optimizer": "signsgd", "compression": None, "aggregation": "mean"},
    # Compressed adaptive optimizers at their defaults.
    "onebitadam": {"optimizer": "onebitadam"},
    "compams": {"optimizer": "compams"},
    # Local SGD / DiLoCo: Adam(W) averaged every 32 steps, int8 changes.
    "localsgd_int8": {"average_every": 32, "average_compression": "int8"},
    "diloco_int8": {"optimizer": "diloco", "average_compression": "int8"},
}
WINDOW = 10
HIDDEN = 2048


def worker(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    workers = int(os.environ.get("TFSO_NUM_WORKERS", "1"))
    cores = os.cpu_count() or 1
    tf.config.threading.set_intra_op_parallelism_threads(max(1, cores // workers))
    tf.config.threading.set_inter_op_parallelism_threads(2)
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import tf_secondorder as tfso
    from tf_secondorder.compat.trainer import worker_index

    strategy = tfso.distribute.multi_worker_strategy()
    index = worker_index(strategy)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    global_batch = args.batch_per_worker * strategy.num_replicas_in_sync
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=0)
        .repeat()
        .batch(global_batch, drop_remainder=True)
    )
    options = dict(SETTINGS[args.setting])
    if isinstance(options.get("compression"), dict):
        spec = dict(options["compression"])
        options["compression"] = tfso.compression.get(spec.pop("name"), **spec)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((64,))]
            + [keras.layers.Dense(HIDDEN, activation="relu") for _ in range(3)]
            + [keras.layers.Dense(10)]
        )
        name = options.pop("optimizer", "adam")
        if name == "signsgd":
            optimizer = tfso.SignSGD(args.sign_learning_rate, momentum=0.9, **options)
        elif name == "onebitadam":
            optimizer = tfso.OneBitAdam(args.learning_rate, **options)
        elif name == "compams":
            optimizer = tfso.CompAMS(args.learning_rate, **options)
        elif name == "diloco":
            optimizer = tfso.distributed(
                keras.optimizers.AdamW(args.learning_rate),
                average_every=32,
                outer_optimizer=keras.optimizers.SGD(0.8, momentum=0.3, nesterov=True),
                **options,
            )
        else:
            optimizer = tfso.distributed(
                keras.optimizers.Adam(args.learning_rate), **options
            )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        optimizer.build(model.trainable_variables)

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step_ends, self.windows, self.start = [], [], None
            self.total = 0.0  # the loss summed over the steps so far

        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            # logs["loss"] is the mean since the epoch began; the window's
            # mean is the difference of the running sums.
            mean = float(logs["loss"])  # waits for the step
            self.step_ends.append(time.perf_counter() - self.start)
            steps = len(self.step_ends)
            if args.profile and index == 0 and steps == 10:
                tf.profiler.experimental.start(args.profile)
            if args.profile and index == 0 and steps == 15:
                tf.profiler.experimental.stop()
            if steps % WINDOW:
                return
            total = mean * steps
            loss = (total - self.total) / WINDOW
            self.total = total
            self.windows.append([steps, self.step_ends[-1], loss])
            reached = args.target is not None and loss <= args.target
            if reached or self.step_ends[-1] > args.max_seconds:
                self.model.stop_training = True

    record = Record()
    # One epoch, windows of WINDOW steps recorded by the callback: an epoch's
    # end averages local-SGD replicas, which would add rounds to the run.
    model.fit(
        data,
        epochs=1,
        steps_per_epoch=WINDOW * max(1, args.steps // WINDOW),
        verbose=0,
        callbacks=[record],
    )
    stats = optimizer.communication_stats()
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    if index == 0:
        with open(args.result, "w") as f:
            json.dump(
                {
                    "setting": args.setting,
                    "workers": strategy.num_replicas_in_sync,
                    "parameters": params,
                    "bytes_per_step": float(stats["bytes_per_step"]),
                    "float32_bytes_per_step": float(stats["float32_bytes_per_step"]),
                    "step_ends": record.step_ends,
                    "windows": record.windows,
                },
                f,
            )


def summarize(result, target, skip=3):
    ends = result["step_ends"]
    times = [b - a for a, b in zip(ends[skip:], ends[skip + 1 :])]
    times.sort()
    median = times[len(times) // 2] if times else float("nan")
    reached = [w for w in result["windows"] if target is not None and w[2] <= target]
    return {
        "step_s": median,
        "steps": len(ends),
        "final_loss": result["windows"][-1][2] if result["windows"] else None,
        "steps_to_target": reached[0][0] if reached else None,
        "time_to_target_s": reached[0][1] if reached else None,
        "elapsed_s": ends[-1] if ends else None,
    }


def driver(args):
    from tf_secondorder.distribute import launch as launcher

    os.makedirs(args.tmp, exist_ok=True)
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for rate in args.rates.split(","):
            for setting in args.settings.split(","):
                result = os.path.join(args.tmp, f"{workers}-{rate}-{setting}.json")
                steps = args.steps
                if setting == "fp32" and rate in args.short_rates.split(","):
                    steps = args.short_steps
                command = [sys.executable, os.path.abspath(__file__), "--worker"]
                command += ["--setting", setting, "--result", result]
                command += [
                    "--steps",
                    str(steps),
                    "--max-seconds",
                    str(args.max_seconds),
                ]
                command += ["--learning-rate", str(args.learning_rate)]
                command += ["--sign-learning-rate", str(args.sign_learning_rate)]
                command += ["--batch-per-worker", str(args.batch_per_worker)]
                if args.profile:
                    command += ["--profile", os.path.join(args.profile, setting)]
                if args.target is not None and steps == args.steps:
                    command += ["--target", str(args.target)]
                print(f"== {workers} workers, {rate}, {setting}", flush=True)
                started = time.perf_counter()
                code = launcher.launch(
                    command,
                    workers=workers,
                    rate=None if rate == "none" else rate,
                    timeout=args.max_seconds + 300,
                    out=open(os.devnull, "w") if not args.verbose else None,
                )
                if code == 130:
                    print("   interrupted; stopping", flush=True)
                    return 130
                if code != 0:
                    print(f"   failed with exit code {code}", flush=True)
                    continue
                with open(result) as f:
                    raw = json.load(f)
                row = {"workers": workers, "rate": rate, **raw}
                row.update(summarize(raw, args.target if steps == args.steps else None))
                row["wall_s"] = time.perf_counter() - started
                rows.append(row)
                print(
                    f"   step {row['step_s'] * 1e3:.0f} ms, bytes/step "
                    f"{row['bytes_per_step']:.3g}, final loss {row['final_loss']:.4f}, "
                    f"time to target {row['time_to_target_s']}",
                    flush=True,
                )
    add_ratios(rows)
    print(table(rows, args.target))
    with open(args.out, "w") as f:
        json.dump(
            {"command": " ".join(sys.argv), "target": args.target, "rows": rows},
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


def add_ratios(rows):
    for row in rows:
        base = [
            r
            for r in rows
            if r["setting"] == "fp32"
            and (r["workers"], r["rate"]) == (row["workers"], row["rate"])
        ]
        base = base[0] if base else None
        row["fp32_step_over_this"] = base["step_s"] / row["step_s"] if base else None
        row["bytes_ratio"] = row["float32_bytes_per_step"] / max(
            row["bytes_per_step"], 1
        )
        both = base and base["time_to_target_s"] and row["time_to_target_s"]
        row["time_to_target_vs_fp32"] = (
            row["time_to_target_s"] / base["time_to_target_s"] if both else None
        )


def _fmt(value, pattern, missing="—"):
    return missing if value is None else pattern.format(value)


def table(rows, target):
    lines = [
        "| workers | rate | setting | MB/step (fp32 / this) | step ms | "
        f"fp32 step / this | steps to loss {target} | time to target s | "
        "vs fp32 | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['rate']} | {r['setting']} | "
            f"{r['bytes_per_step'] / 1e6:.3g} (1/{r['bytes_ratio']:.1f}) | "
            f"{r['step_s'] * 1e3:.0f} | {_fmt(r['fp32_step_over_this'], '{:.2f}×')} | "
            f"{_fmt(r['steps_to_target'], '{}')} | "
            f"{_fmt(r['time_to_target_s'], '{:.0f}')} | "
            f"{_fmt(r['time_to_target_vs_fp32'], '{:.2f}×')} | "
            f"{_fmt(r['final_loss'], '{:.4f}')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--rates", default="1gbit,100mbit")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--sign-learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-per-worker", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument(
        "--short-rates",
        default="100mbit",
        help="rates at which fp32 runs only --short-steps (its step time alone)",
    )
    parser.add_argument("--short-steps", type=int, default=10)
    parser.add_argument("--tmp", default="/tmp/tfso_multiworker_bench")
    parser.add_argument("--out", default="multiworker_results.json")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--profile", default=None, help="TF profiler dir (worker 0)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.settings.split(",")) - set(SETTINGS))
    if unknown:
        parser.error(f"--settings must be among {sorted(SETTINGS)}; received {unknown}")
    if args.worker:
        return worker(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
