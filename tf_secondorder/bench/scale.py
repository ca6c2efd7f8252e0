"""How an optimizer's cost grows with the model: `tf-secondorder scale`.

For each model size and optimizer a fresh process (so that its first step
and peak memory are its own) builds the model, trains `steps` steps with
`train_on_batch` on a fixed pool of batches, and reports the first step
(trace + graph optimisation), the median, amortised (mean after the first)
and worst step, the seconds spent computing refreshes, the optimizer graph's
op count, optimizer state / weights, the process's peak resident memory and
the training loss at the end. Configurations are interleaved over repeats.

Models: plain MLPs of 4 square Dense layers on synthetic regression data
(batch 256), and byte-level Transformer LMs on the pydoc text (context 128,
batch 32: 4096 tokens per step).
"""

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MODELS = {
    # name: (kind, options)
    "mlp-1024": ("mlp", dict(width=1024)),
    "mlp-2048": ("mlp", dict(width=2048)),
    "lm-1m": ("lm", dict(d_model=128, heads=4, mlp=512, blocks=4)),
    "lm-10m": ("lm", dict(d_model=384, heads=6, mlp=1536, blocks=6)),
    "lm-50m": ("lm", dict(d_model=768, heads=12, mlp=3072, blocks=7)),
}
# name: (optimizer, its options beyond the library's defaults)
OPTIMIZERS = {
    "adam": ("adam", {}),
    "shampoo": ("shampoo", {}),
    "shampoo-instep": ("shampoo", {"root_refresh": "in_step"}),
    "shampoo-lowmem": (
        "shampoo",
        {
            "statistics_dtype": "bfloat16",
            "packed_statistics": True,
            "preconditioner_dtype": "bfloat16",
        },
    ),
    "soap": ("soap", {}),
}


def _model_and_batches(name, steps, seed=0):
    import keras
    import tensorflow as tf

    from tf_secondorder.bench import tasks
    from tf_secondorder.bench.tasks.models import byte_transformer

    kind, options = MODELS[name]
    keras.utils.set_random_seed(seed)
    if kind == "mlp":
        width = options["width"]
        model = keras.Sequential(
            [keras.Input((width,))]
            + [keras.layers.Dense(width, activation="tanh") for _ in range(3)]
            + [keras.layers.Dense(width)]
        )
        rng = np.random.default_rng(seed)
        target = rng.normal(size=(width, width)).astype("float32") / np.sqrt(width)
        pool = []
        for _ in range(min(steps, 16)):
            x = rng.normal(size=(256, width)).astype("float32")
            pool.append((x, np.tanh(x @ target)))
        return model, pool, "mse"
    model = byte_transformer(seed=seed, **options)
    data = iter(tasks.get_task("pydoc-lm").make_dataset(seed))
    pool = [tuple(t.numpy() for t in next(data)) for _ in range(min(steps, 16))]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    del tf
    return model, pool, loss


def optimizer_op_count(optimizer, variables):
    """Ops in the graph of one `apply` (branches and nested functions in)."""
    import tensorflow as tf

    specs = [tf.TensorSpec(v.shape, v.dtype) for v in variables]
    graph = (
        tf.function(lambda grads: optimizer.apply(grads, variables))
        .get_concrete_function(specs)
        .graph.as_graph_def()
    )
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


def _pending(optimizer):
    host = getattr(getattr(optimizer, "_root_refresh", None), "host", None)
    return host.pending_bytes() if host is not None else 0


def measure(model_name, optimizer_name, steps, learning_rate, frequency):
    """One configuration, in this process; returns its record."""
    import tensorflow as tf

    from tf_secondorder.bench.runner import make_optimizer, variable_bytes

    model, pool, loss = _model_and_batches(model_name, steps)
    base, options = OPTIMIZERS[optimizer_name]
    options = dict(options)
    if frequency is not None and base != "adam":
        options["precondition_frequency"] = frequency
    optimizer = make_optimizer(base, learning_rate, options)
    model.compile(optimizer=optimizer, loss=loss)
    times, losses = [], []
    for step in range(steps + 1):
        if hasattr(optimizer, "advance_root_pipeline"):
            # What `fit`'s callback does between steps (timed with the step).
            start = time.perf_counter()
            optimizer.advance_root_pipeline()
        else:
            start = time.perf_counter()
        x, y = pool[step % len(pool)]
        losses.append(float(model.train_on_batch(x, y)))
        times.append(time.perf_counter() - start)
    first, later = times[0], np.array(times[1:])
    weights = variable_bytes(model.trainable_variables)
    record = {
        "model": model_name,
        "optimizer": optimizer_name,
        "options": options,
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "steps": steps,
        "first_step_seconds": first,
        "median_step_seconds": float(np.median(later)),
        "amortised_step_seconds": float(np.mean(later)),
        "worst_step_seconds": float(np.max(later)),
        "state_weight_ratio": variable_bytes(optimizer.variables) / weights,
        # With the host's pending roots of a pipelined refresh (not saved).
        "memory_weight_ratio": (
            variable_bytes(optimizer.variables) + _pending(optimizer)
        )
        / weights,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": float(np.mean(losses[-10:])),
    }
    for counter in ("refresh_seconds", "refreshes", "refresh_waits", "root_failures"):
        if hasattr(optimizer, counter):
            record[counter] = getattr(optimizer, counter).numpy().item()
    # Counted on a second optimizer, after the peak memory was read.
    counted = make_optimizer(base, learning_rate, options)
    counted.build(model.trainable_variables)
    record["optimizer_ops"] = optimizer_op_count(counted, model.trainable_variables)
    del tf
    return record


def run(models, optimizers, steps, repeats, learning_rate, frequency, out):
    """Every configuration in a fresh process, interleaved over repeats;
    returns the records (also written to `out`/scale.json)."""
    records = []
    os.makedirs(out, exist_ok=True)
    for repeat in range(repeats):
        for model_name in models:
            for optimizer_name in optimizers:
                print(
                    f"== {model_name} {optimizer_name} (repeat {repeat + 1})",
                    flush=True,
                )
                command = [
                    sys.executable,
                    "-m",
                    "tf_secondorder.bench.scale",
                    model_name,
                    optimizer_name,
                    str(steps),
                    str(learning_rate),
                    "" if frequency is None else str(frequency),
                ]
                done = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                )
                lines = [
                    line
                    for line in done.stdout.splitlines()
                    if line.startswith("RECORD ")
                ]
                if done.returncode or not lines:
                    raise RuntimeError(
                        f"{model_name} {optimizer_name} failed:\n{done.stderr[-3000:]}"
                    )
                record = json.loads(lines[-1][len("RECORD ") :])
                record["repeat"] = repeat
                records.append(record)
                with open(os.path.join(out, "scale.json"), "w") as f:
                    json.dump(records, f, indent=1)
    return records


def format_table(records):
    """Medians over repeats, times as ratios to Adam's at the same size."""
    rows = {}
    for r in records:
        rows.setdefault((r["model"], r["optimizer"]), []).append(r)

    def median(group, key):
        values = [r[key] for r in group if r.get(key) is not None]
        return float(np.median(values)) if values else None

    lines = [
        "| model | params | optimizer | first step s (× Adam) | median × | "
        "amortised × | worst × | refresh s | ops | state/weights (with pending) | "
        "peak MiB | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, optimizer), group in rows.items():
        adam = rows.get((model, "adam"))

        def ratio(key, group=group, adam=adam):
            if not adam:
                return "—"
            spread = [
                r[key] / a[key]
                for r, a in zip(
                    sorted(group, key=lambda r: r["repeat"]),
                    sorted(adam, key=lambda r: r["repeat"]),
                )
            ]
            text = f"{np.median(spread):.2f}"
            if len(spread) > 1:
                text += f" [{min(spread):.2f}–{max(spread):.2f}]"
            return text

        first = median(group, "first_step_seconds")
        lines.append(
            f"| {model} | {group[0]['parameters'] / 1e6:.1f} M | {optimizer} | "
            f"{first:.2f} ({ratio('first_step_seconds')}) | "
            f"{ratio('median_step_seconds')} | {ratio('amortised_step_seconds')} | "
            f"{ratio('worst_step_seconds')} | "
            f"{median(group, 'refresh_seconds') or 0:.2f} | "
            f"{int(median(group, 'optimizer_ops'))} | "
            f"{median(group, 'state_weight_ratio'):.2f} "
            f"({median(group, 'memory_weight_ratio'):.2f}) | "
            f"{median(group, 'peak_rss_mib'):.0f} | "
            f"{median(group, 'final_loss'):.4g} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    model_name, optimizer_name, steps, learning_rate, frequency = sys.argv[1:6]
    record = measure(
        model_name,
        optimizer_name,
        int(steps),
        float(learning_rate),
        int(frequency) if frequency else None,
    )
    print("RECORD " + json.dumps(record), flush=True)


def register(subparsers):
    """Adds `scale` to the `tf-secondorder` subcommands."""
    sc = subparsers.add_parser(
        "scale",
        help="how first step, step time, refresh and memory grow with the model",
        description="Trains each model size with each optimizer (library "
        "defaults, train_on_batch) in a fresh process and prints first step, "
        "median / amortised / worst step as ratios to Adam's, refresh "
        "seconds, the optimizer's op count, state / weights, peak memory and "
        "the final training loss. Models: mlp-1024, mlp-2048 (4 square Dense "
        "layers, batch 256), lm-1m, lm-10m, lm-50m (byte-level Transformers "
        "on the pydoc text, 4096 tokens per step).",
    )
    sc.add_argument("--models", default="mlp-1024,mlp-2048")
    sc.add_argument(
        "--optimizers",
        default="adam,shampoo,shampoo-instep,soap",
        help="adam, shampoo (defaults: pipelined roots), shampoo-instep "
        "(root_refresh='in_step'), shampoo-lowmem (bfloat16 packed "
        "statistics, bfloat16 roots), soap",
    )
    sc.add_argument("--steps", type=int, default=120, help="steps after the first")
    sc.add_argument("--repeats", type=int, default=1)
    sc.add_argument("--lr", type=float, default=1e-3)
    sc.add_argument(
        "--frequency",
        type=int,
        default=None,
        help="precondition_frequency for Shampoo and SOAP (default: theirs), "
        "to see refreshes in short runs of large models",
    )
    sc.add_argument("--out", default="bench_out/scale")
    sc.set_defaults(func=command)
    return sc


def command(args):
    """Runs `tf-secondorder scale`; invalid arguments raise UsageError."""
    from tf_secondorder.bench.usage import UsageError

    models = [m for m in args.models.split(",") if m]
    optimizers = [o for o in args.optimizers.split(",") if o]
    for name, known, what in (
        (models, MODELS, "models"),
        (optimizers, OPTIMIZERS, "optimizers"),
    ):
        unknown = [n for n in name if n not in known]
        if unknown or not name:
            raise UsageError(
                f"`--{what}` must be a comma-separated list of {sorted(known)}; "
                f"received {getattr(args, what)!r}"
            )
    if args.steps < 2 or args.repeats < 1:
        raise UsageError(
            f"`--steps` must be >= 2 and `--repeats` >= 1; received "
            f"{args.steps} and {args.repeats}"
        )
    if args.frequency is not None and args.frequency < 1:
        raise UsageError(f"`--frequency` must be >= 1; received {args.frequency}")
    records = run(
        models,
        optimizers,
        args.steps,
        args.repeats,
        args.lr,
        args.frequency,
        args.out,
    )
    print(format_table(records))
    print(f"wrote {os.path.join(args.out, 'scale.json')}")
    return 0
