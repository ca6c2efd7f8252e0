"""The `tf-secondorder` command."""

import argparse
import json
import os
import platform
import sys

from tf_secondorder.bench.arguments import (
    UsageError,
    check_bench_args,
    check_optimizers,
    logical_strategy,
    usage_error,
)


def bench(args):
    names, lrs, steps, eval_every, note, shampoo_options = check_bench_args(args)
    if args.average_from is not None:
        if args.batch_schedule is not None:
            raise usage_error(
                "average_from", "given without `batch_schedule`", args.average_from
            )
        if not 0 <= args.average_from < steps:
            raise usage_error(
                "average_from",
                f"a step in [0, {steps}) (the run's steps)",
                args.average_from,
            )

    import keras
    import tensorflow as tf

    from tf_secondorder import __version__
    from tf_secondorder.bench import report, runner, tasks

    strategy = logical_strategy(args.replicas) if args.replicas > 1 else None
    try:
        task = tasks.get_task(args.task, steps, data_dir=args.data_dir)
    except tasks.TaskUnavailable as e:
        print(f"tf-secondorder bench: {e}", file=sys.stderr)
        return 2
    task.eval_every = eval_every
    if note:
        print(f"tf-secondorder bench: {note}", flush=True)
    lrs = lrs if lrs is not None else list(task.lrs)
    check_optimizers(names, lrs, shampoo_options, strategy)
    if args.batch_schedule is not None:
        from tf_secondorder.bench import batch_schedules

        if task.make_examples is None:
            raise UsageError(
                f"`batch_schedule` needs a task that can batch single examples; "
                f"received task {task.name!r}"
            )
        budget = args.samples or task.steps * task.batch_size
        batch_schedules.bench(args, task, names, lrs, strategy, budget)
        return 0
    os.makedirs(args.out, exist_ok=True)
    seeds = [args.seed + repeat for repeat in range(args.repeats)]
    results = []
    # Repeats are interleaved (adam, shampoo, adam, shampoo, ...) so that slow
    # drifts of the machine touch every configuration alike.
    for repeat, seed in enumerate(seeds):
        for name in names:
            for lr in lrs:
                where = (
                    f" (repeat {repeat + 1}/{args.repeats}, seed {seed})"
                    if args.repeats > 1
                    else ""
                )
                print(f"== {task.name}: {name} lr={lr:g}{where}", flush=True)
                options = shampoo_options if name.split("+")[0] == "shampoo" else None
                results.append(
                    runner.run(
                        task,
                        name,
                        lr,
                        options,
                        seed=seed,
                        verbose=args.verbose,
                        strategy=strategy,
                        repeat=repeat,
                        precision=args.precision,
                        average_from=args.average_from,
                    )
                )
    summaries = [
        report.summarize(task, [r for r in results if r["repeat"] == repeat])
        for repeat in range(args.repeats)
    ]
    summary = dict(summaries[0])
    summary["metric"] = task.info.get("metric", "loss")
    summary["seeds"] = seeds
    configurations = report.aggregate(results)
    print(report.format_table(summary, results, configurations))
    results_json = {
        **summary,
        "steps": task.steps,
        "eval_every": task.eval_every,
        "replicas": args.replicas,
        "repeats": args.repeats,
        "precision": args.precision,
        "targets": [
            {"repeat": repeat, "seed": seed, **s}
            for repeat, (seed, s) in enumerate(zip(seeds, summaries, strict=True))
        ],
        "command": " ".join(["tf-secondorder"] + sys.argv[1:]),
        "versions": {
            "tf_secondorder": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
        "task_info": task.info,
        "configurations": configurations,
        "runs": results,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results_json, f, indent=1)
    plots = report.plot(summary, results, args.out)
    print(f"wrote {os.path.join(args.out, 'results.json')}, " + ", ".join(plots))
    return 0


def scale(args):
    from tf_secondorder.bench import scale as scaling

    models = [m for m in args.models.split(",") if m]
    optimizers = [o for o in args.optimizers.split(",") if o]
    for name, known, what in (
        (models, scaling.MODELS, "models"),
        (optimizers, scaling.OPTIMIZERS, "optimizers"),
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
    records = scaling.run(
        models,
        optimizers,
        args.steps,
        args.repeats,
        args.lr,
        args.frequency,
        args.out,
    )
    print(scaling.format_table(records))
    print(f"wrote {os.path.join(args.out, 'scale.json')}")
    return 0


def prepare_data(args):
    """Builds the bench's offline TFDS datasets into the data dir."""
    if args.data_dir is not None and os.path.isfile(args.data_dir):
        raise usage_error(
            "data_dir", "a directory", f"{args.data_dir!r}, which is a file"
        )
    from tf_secondorder.bench import tasks

    try:
        tasks._tfds()
    except tasks.TaskUnavailable as e:
        print(f"tf-secondorder prepare-data: {e}", file=sys.stderr)
        return 2
    from tf_secondorder.bench import tfds_builders

    for name, builder in tfds_builders.prepare(args.data_dir).items():
        print(f"{name}: {os.fspath(builder.data_path)}")
    return 0


def launch(args):
    from tf_secondorder.distribute import launch as launcher

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        print("tf-secondorder launch: give the command after --", file=sys.stderr)
        return 2
    if args.rate is not None:
        try:
            launcher.rate_bits_per_second(args.rate)
        except ValueError as e:
            print(f"tf-secondorder launch: {e}", file=sys.stderr)
            return 2
    env = None
    if args.heartbeat_timeout is not None:
        if not args.heartbeat_timeout > 0 or args.heartbeat_timeout == float("inf"):
            print(
                "tf-secondorder launch: `heartbeat_timeout` must be a finite "
                f"number > 0; received {args.heartbeat_timeout!r}",
                file=sys.stderr,
            )
            return 2
        env = dict(os.environ, TFSO_HEARTBEAT_TIMEOUT=str(args.heartbeat_timeout))
    try:
        return launcher.launch(
            command,
            workers=args.workers,
            rate=args.rate,
            timeout=args.timeout,
            max_restarts=args.max_restarts,
            env=env,
        )
    except (launcher.LaunchError, ValueError) as e:
        print(f"tf-secondorder launch: {e}", file=sys.stderr)
        return 2


def main(argv=None):
    """Runs `tf-secondorder` with `argv`; invalid arguments raise UsageError."""
    parser = argparse.ArgumentParser(prog="tf-secondorder")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench",
        help="train optimizers on a benchmark task and compare",
        description="Trains every optimizer at every learning rate on one task "
        "with model.fit and compares them with the best Adam run: steps, step "
        "time, time and first step (trace and compile) as ratios to Adam, and "
        "optimizer state as a multiple of the model's trainable weights. Data "
        "comes through TensorFlow Datasets and is never downloaded.",
    )
    b.add_argument(
        "--task",
        default="digits-ae",
        help="digits-ae (autoencoder on scikit-learn's digits), pydoc-lm "
        "(byte-level Transformer on CPython's pydoc text), pydoc-gpt2 "
        "(keras-hub's GPT-2 from a config on the same text; needs "
        '`pip install -e ".[gpu,bench,hub]"` in its own environment): all '
        "built as TFDS datasets on this machine; or mnist, cifar10: TFDS "
        "datasets already prepared in the data dir",
    )
    b.add_argument(
        "--optimizers",
        default="adam,shampoo",
        help="comma-separated, distinct: adam, adamw, sgd, lion, muon, shampoo, "
        "soap, signsgd, onebitadam, compams, diloco (AdamW, 32 local steps, "
        "outer Nesterov SGD), localsgd (Adam, averaged every 32 steps), each "
        "optionally +COMPRESSOR (e.g. shampoo+sign, compams+topk; for diloco "
        "and localsgd it compresses the averaged change)",
    )
    b.add_argument(
        "--lrs",
        default=None,
        help="comma-separated learning rates > 0; default: the task's grid "
        "(3e-4,1e-3,3e-3)",
    )
    b.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per run, >= 2; default: the task's (2000). Exactly "
        "this many are trained; without --eval-every the loss is evaluated every "
        "task interval if it divides STEPS, else every largest divisor of STEPS "
        "below it (e.g. --steps 120 on digits-ae: every 40)",
    )
    b.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between task-loss evaluations, a divisor of --steps; "
        "default: the task's (50 for digits-ae, 100 for the others), see --steps",
    )
    b.add_argument(
        "--seed", type=int, default=0, help="seed of the first repeat (see --repeats)"
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration this many times, interleaved (adam, "
        "shampoo, adam, shampoo, ...), repeat i with seed SEED+i; ratios are "
        "taken within a repeat and the table shows each one's median and "
        "[min-max] over the repeats",
    )
    b.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="train under MirroredStrategy on this many logical CPUs (or GPUs); "
        "the table then shows bytes per replica per step",
    )
    b.add_argument(
        "--batch-schedule",
        default=None,
        help="compare batch schedules at equal samples instead of optimizers "
        "at equal steps: comma-separated, each B (a fixed global batch) or "
        "growing:B1:RHO[:CAP] (CR-PSGD: batch t holds B1*RHO^t examples, "
        "capped); prints the final loss against the best fixed batch's and "
        "the rounds against its rounds, and plots loss against samples and "
        "rounds. Tasks: digits-ae, digits-mlp, digits-logreg",
    )
    b.add_argument(
        "--samples",
        type=int,
        default=None,
        help="examples per run with --batch-schedule; default: the task's "
        "steps times its batch size",
    )
    b.add_argument(
        "--precision",
        default="float32",
        help="Keras dtype policy of the models: float32, mixed_bfloat16 or "
        "mixed_float16 (Keras wraps the optimizer in a LossScaleOptimizer)",
    )
    b.add_argument(
        "--average-from",
        type=int,
        default=None,
        metavar="STEP",
        help="also keep the mean of the iterates from this step on "
        "(tfso.callbacks.IterateAveraging) and score it at every evaluation: "
        "the table's `averaged` column is its final loss",
    )
    b.add_argument(
        "--shampoo-option",
        action="append",
        metavar="KEY=VALUE",
        help="Shampoo argument for this run, e.g. precondition_frequency=50 "
        "(VALUE is read as JSON, else as a string); repeat for several",
    )
    b.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data dir; default: TFDS_DATA_DIR or ~/tensorflow_datasets. "
        "digits-ae, pydoc-lm and pydoc-gpt2 build their datasets there on "
        "first use",
    )
    b.add_argument(
        "--out", default="bench_out", help="directory for results.json and plots"
    )
    b.add_argument(
        "--verbose", type=int, default=1, help="Keras progress bar (0, 1, 2)"
    )
    b.set_defaults(func=bench)
    sc = sub.add_parser(
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
    sc.set_defaults(func=scale)
    pd = sub.add_parser(
        "prepare-data",
        help="build the TFDS datasets of digits-ae and pydoc-lm (no download)",
        description="Builds the TensorFlow Datasets sklearn_digits (scikit-learn's "
        "digits) and pydoc_topics (CPython's pydoc text) from data on this "
        "machine into the TFDS data dir. `bench` does this on first use; "
        "afterwards tfds.load('sklearn_digits', data_dir=...) works anywhere "
        "tf_secondorder.bench.tfds_builders is imported.",
    )
    pd.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data dir; default: TFDS_DATA_DIR or ~/tensorflow_datasets",
    )
    pd.set_defaults(func=prepare_data)
    lp = sub.add_parser(
        "launch",
        help="run a script as N MultiWorkerMirroredStrategy workers on 127.0.0.1",
        description="Example: tf-secondorder launch --workers 2 --rate 1gbit "
        "-- python train.py --epochs 3",
    )
    lp.add_argument("--workers", type=int, default=2)
    lp.add_argument(
        "--rate",
        default=None,
        help="limit the workers' network to this tc rate (e.g. 100mbit, 1gbit); "
        "runs them in a private network namespace (needs root)",
    )
    lp.add_argument("--timeout", type=float, default=None, help="seconds")
    lp.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        help="seconds a worker may go without a heartbeat before the job aborts, "
        "for workers that create their strategy with "
        "tfso.distribute.multi_worker_strategy() (default 300; TensorFlow's own "
        "is 10, less than one all-reduce on a slow network)",
    )
    lp.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart all workers up to this many times after a failure "
        "(with tfso.callbacks.BackupAndRestore, training resumes)",
    )
    lp.add_argument("cmd", nargs=argparse.REMAINDER, help="-- program and arguments")
    lp.set_defaults(func=launch)
    args = parser.parse_args(argv)
    return args.func(args)


def console(argv=None):
    """The `tf-secondorder` command: invalid arguments exit with code 2."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"tf-secondorder: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console())
