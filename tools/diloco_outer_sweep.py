"""DiLoCo outer-optimizer settings at H = 32, 2 replicas (or --replicas N),
the task's steps, AdamW inside (final task loss of each).

    python tools/diloco_outer_sweep.py [--task digits-ae] [--lr 3e-3] [CONFIG ...]

CONFIG names an outer Nesterov SGD: "sgd<lr>_m<momentum>n", e.g.
sgd0.8_m0.3n; "sgd1.0_m0.0n" is plain averaging with AdamW inside.
"""

import argparse
import json
import re

import keras

import tf_secondorder as tfso
from tf_secondorder.bench import runner, tasks
from tf_secondorder.bench.arguments import logical_strategy

DEFAULT_CONFIGS = ["sgd1.0_m0.5n", "sgd0.8_m0.3n", "sgd1.0_m0.3n"]


def parse(name):
    """ "sgd0.8_m0.3n" -> (0.8, 0.3)."""
    match = re.fullmatch(r"sgd([0-9.]+)_m([0-9.]+)n", name)
    if match is None:
        raise ValueError(
            "`CONFIG` must look like sgd0.8_m0.3n (outer lr, momentum); "
            f"received {name!r}"
        )
    return float(match[1]), float(match[2])


def outer(name):
    lr, momentum = parse(name)
    return keras.optimizers.SGD(lr, momentum=momentum, nesterov=momentum > 0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="digits-ae")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    args = parser.parse_args()
    for name in args.configs:
        parse(name)  # bad names fail before TensorFlow starts
    if args.replicas < 2:
        parser.error(f"--replicas must be >= 2; received {args.replicas}")
    strategy = logical_strategy(args.replicas)
    task = tasks.get_task(args.task)
    out = {}
    for name in args.configs:

        def make(lr, compression=None, name=name, **o):
            return tfso.distributed(
                keras.optimizers.AdamW(lr, **o),
                average_every=32,
                outer_optimizer=outer(name),
                average_compression=compression,
            )

        runner.TFSO_OPTIMIZERS["x_" + name] = make
        r = runner.run(task, "x_" + name, args.lr, verbose=0, strategy=strategy)
        out[name] = r["final_loss"]
        print(name, r["final_loss"], r.get("run_bytes_ratio"), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
