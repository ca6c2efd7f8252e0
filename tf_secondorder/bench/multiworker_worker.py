"""One worker of `tf-secondorder multiworker` (run by it through
`tf-secondorder launch`'s launcher, never by hand): trains the
communication-bound MLP with one compression setting and, on worker 0,
writes its step times and windowed losses to `--result`.

    python -m tf_secondorder.bench.multiworker_worker --setting fp32 --result r.json
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--sign-learning-rate", type=float, required=True)
    parser.add_argument("--batch-per-worker", type=int, required=True)
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--profile", default=None)
    return worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
