"""`tf-secondorder bytes`: bytes per replica per step of every compressor
and aggregator, against an uncompressed float32 all-reduce.

For each replica count a fresh process sets up that many logical CPUs (or
GPUs) and a MirroredStrategy, builds a Dense stack of the given widths, and
trains `STEPS` steps of `tfso.distributed(SGD)` for each setting: float32,
then every registered compressor (`tfso.compression.names()`) and a few
non-default variants, each with the "mean" aggregation and, where the
compressor allows them, "majority_vote", "bidirectional" and "artemis".
The counts come from `optimizer.communication_stats()` after those steps:
the bytes a replica hands to collectives in the last step (sent) and the
bytes the collectives deliver to it (received), each as a ratio to the
float32 row of the same process.
"""

import argparse
import json
import os
import subprocess
import sys

from tf_secondorder.bench.usage import usage_error

STEPS = 2
# Non-default settings of registered compressors: label -> factory.
VARIANTS = {
    "qsgd4": lambda c: c.QSGD(bits=4),
    "natural4": lambda c: c.Natural(levels=4),
}


def register(subparsers):
    """Adds `bytes` to the `tf-secondorder` subcommands."""
    p = subparsers.add_parser(
        "bytes",
        help="bytes per replica per step of every compressor and aggregator",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--replicas",
        default="2,4,8",
        help="comma-separated replica counts >= 2, each in a fresh process",
    )
    p.add_argument(
        "--widths",
        default="1024,1024",
        help="the model: input width, then each Dense layer's units "
        "(default 1024,1024: one 1024x1024 layer plus bias, 1,049,600 "
        "parameters; 784,1024,512,10 is an MLP of 1,333,770)",
    )
    p.add_argument(
        "--compressions",
        default=None,
        help="comma-separated compressors to measure (the float32 row is "
        "always measured): names of tfso.compression.names(), qsgd4 (QSGD "
        "with 4 bits) or natural4 (natural dithering, 4 levels); default: all",
    )
    p.add_argument("--out", default=None, help="write every row as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=command)
    return p


def _integers(name, text, minimum, count=1):
    expected = (
        f"comma-separated integers >= {minimum}"
        + (f", at least {count}" if count > 1 else "")
        + f", e.g. {','.join([str(max(minimum, 2))] * count)}"
    )
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise usage_error(name, expected, repr(text)) from None
    if len(values) < count or min(values) < minimum:
        raise usage_error(name, expected, repr(text))
    return values


def compression_labels():
    import tf_secondorder as tfso

    return tfso.compression.names() + list(VARIANTS)


def settings(labels):
    """[(compression label, aggregation, CommunicationConfig options)] of
    float32 and the compressors `labels` (of `compression_labels()`)."""
    import tf_secondorder as tfso

    c = tfso.compression
    compressors = [
        (
            label,
            (lambda f=VARIANTS[label]: f(c))
            if label in VARIANTS
            else (lambda label=label: c.get(label)),
        )
        for label in labels
    ]
    rows = [("float32", "mean", dict)]
    for label, make in compressors:
        # Every aggregation the compressor declares it works under.
        for aggregation in make().aggregations:
            rows.append(
                (
                    label,
                    aggregation,
                    lambda make=make, aggregation=aggregation: {
                        "compression": make(),
                        "aggregation": aggregation,
                        # Bytes do not depend on Artemis's α; a compressor
                        # without a variance bound has no default.
                        **({"memory_rate": 0.5} if aggregation == "artemis" else {}),
                    },
                )
            )
    return rows


def measure(replicas, widths, labels):
    """The rows of one replica count, in this process (which must not have
    started TensorFlow yet, so that it can set up `replicas` devices)."""
    import keras
    import numpy as np

    import tf_secondorder as tfso
    from tf_secondorder.bench.arguments import logical_strategy

    strategy = logical_strategy(replicas)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * 8 * replicas, widths[0])).astype("float32")
    y = rng.normal(size=(len(x), widths[-1])).astype("float32")
    rows = []
    for compression, aggregation, options in settings(labels):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            layers = [keras.layers.Dense(w, activation="relu") for w in widths[1:-1]]
            model = keras.Sequential(
                [keras.Input((widths[0],)), *layers, keras.layers.Dense(widths[-1])]
            )
            optimizer = tfso.distributed(keras.optimizers.SGD(0.01), **options())
            model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=8 * replicas, epochs=1, verbose=0, shuffle=False)
        stats = optimizer.communication_stats()
        rows.append(
            {
                "replicas": replicas,
                "compression": compression,
                "aggregation": aggregation,
                "parameters": int(
                    sum(np.prod(w.shape) for w in model.trainable_weights)
                ),
                "bytes_per_step": int(stats["bytes_per_step"]),
                "bytes_received_per_step": int(stats["bytes_received_per_step"]),
                "rounds_per_step": stats["rounds"] / STEPS,
            }
        )
    base = rows[0]
    for row in rows:
        row["sent_vs_float32"] = row["bytes_per_step"] / base["bytes_per_step"]
        row["received_vs_float32"] = (
            row["bytes_received_per_step"] / base["bytes_received_per_step"]
        )
    return rows


def format_table(rows):
    head = rows[0]
    lines = [
        f"{head['replicas']} replicas, {head['parameters']:,} parameters; bytes "
        "per replica per step",
        "| compression | aggregation | sent | vs float32 | received | vs float32 "
        "| collectives/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['compression']} | {r['aggregation']} | {r['bytes_per_step']:,} | "
            f"{r['sent_vs_float32']:.4f} | {r['bytes_received_per_step']:,} | "
            f"{r['received_vs_float32']:.4f} | {r['rounds_per_step']:g} |"
        )
    return "\n".join(lines)


def command(args):
    """Runs `tf-secondorder bytes`; invalid arguments raise UsageError."""
    replicas = _integers("replicas", args.replicas, 2)
    widths = _integers("widths", args.widths, 1, count=2)
    labels = compression_labels()
    if args.compressions is not None:
        chosen = [x.strip() for x in args.compressions.split(",")]
        if not all(x in labels for x in chosen) or len(set(chosen)) < len(chosen):
            raise usage_error(
                "compressions",
                f"distinct comma-separated names among {labels}",
                repr(args.compressions),
            )
        labels = chosen
    if args.out is not None and os.path.isdir(args.out):
        raise usage_error("out", "a file path", f"{args.out!r}, which is a directory")
    if args.child:
        for row in measure(replicas[0], widths, labels):
            print(json.dumps(row), flush=True)
        return 0
    import tf_secondorder

    # The child imports this same package, wherever it was imported from.
    root = os.path.dirname(os.path.dirname(os.path.abspath(tf_secondorder.__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    every = []
    for count in replicas:
        done = subprocess.run(
            [sys.executable, "-m", "tf_secondorder.cli", "bytes", "--child"]
            + ["--replicas", str(count), "--widths", args.widths]
            + ["--compressions", ",".join(labels)],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            print(f"tf-secondorder bytes: {count} replicas failed", file=sys.stderr)
            return 1
        rows = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
        print(format_table(rows) + "\n", flush=True)
        every += rows
    if args.out:
        with open(args.out, "w") as f:
            line = " ".join(["tf-secondorder"] + sys.argv[1:])
            json.dump({"command": line, "rows": every}, f, indent=1)
        print(f"wrote {args.out}")
    return 0
