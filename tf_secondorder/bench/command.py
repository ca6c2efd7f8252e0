"""The `tf-secondorder bench` command: trains optimizers on a task and
compares them with the best Adam run (see `register` for its arguments)."""

import json
import os
import platform
import sys

from tf_secondorder.bench.arguments import (
    UsageError,
    check_bench_args,
    logical_strategy,
    parse_lrs_of,
    usage_error,
)


def register(subparsers):
    """Adds `bench` to the `tf-secondorder` subcommands."""
    from tf_secondorder.bench import tasks

    b = subparsers.add_parser(
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
        help=", ".join(f"{n} ({d})" for n, d in tasks.descriptions().items()).replace(
            "%", "%%"
        ),
    )
    b.add_argument(
        "--optimizers",
        default="adam,shampoo",
        help="comma-separated, distinct: adam, adamw, sgd, lion, muon, shampoo, "
        "soap, signsgd, onebitadam, compams, diloco (AdamW, 32 local steps, "
        "outer Nesterov SGD), localsgd (Adam, averaged every 32 steps), each "
        "optionally +COMPRESSOR (e.g. shampoo+sign, compams+topk; for diloco "
        "and localsgd it compresses the averaged change), then optionally "
        "#LABEL to run one optimizer several times with different --option "
        "settings (e.g. localsgd#8,localsgd#16)",
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
        "--jit-compile",
        action="store_true",
        help="compile the models with jit_compile=True (XLA-compiled train "
        "steps; without a strategy)",
    )
    b.add_argument(
        "--option",
        action="append",
        metavar="OPTIMIZER:KEY=VALUE",
        help="an argument of one optimizer for its runs, e.g. "
        "compams:compression_warmup_steps=0, localsgd#8:average_every=8, "
        "shampoo:precondition_frequency=50 (VALUE is read as JSON, else as a "
        "string); OPTIMIZER is a name of --optimizers or its part before '#' "
        "or '+' (then every run of it); KEY is one of the optimizer's arguments, a "
        "communication option (tfso.distribute.CommunicationConfig: "
        "compression, aggregation, average_every, ...), or for diloco "
        "outer_learning_rate (0.8), outer_momentum (0.3), and for diloco and "
        "localsgd average_optimizer_state (false: the weights only); repeat "
        "for several",
    )
    b.add_argument(
        "--lrs-of",
        action="append",
        metavar="OPTIMIZER:LR,LR,...",
        help="an optimizer's own learning rates instead of --lrs, e.g. "
        "muon:3e-3,1e-2,3e-2 (OPTIMIZER as named in --optimizers); repeat for "
        "several",
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
        help="--option shampoo:KEY=VALUE",
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
    return b


def bench(args):
    """Runs `tf-secondorder bench`; invalid arguments raise UsageError."""
    names, lrs, steps, eval_every, note, (parsed, sources) = check_bench_args(args)
    grids = parse_lrs_of(args.lrs_of, names)
    if grids and args.batch_schedule is not None:
        raise usage_error("lrs_of", "given without `batch_schedule`", args.lrs_of)
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
    from tf_secondorder.bench import options, report, runner, tasks

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
    for name in names:
        options.check_optimizers(
            [name], grids.get(name, lrs), parsed, sources, strategy
        )
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
            for lr in grids.get(name, lrs):
                where = (
                    f" (repeat {repeat + 1}/{args.repeats}, seed {seed})"
                    if args.repeats > 1
                    else ""
                )
                print(f"== {task.name}: {name} lr={lr:g}{where}", flush=True)
                results.append(
                    runner.run(
                        task,
                        name,
                        lr,
                        options.for_run(name, parsed),
                        seed=seed,
                        verbose=args.verbose,
                        strategy=strategy,
                        repeat=repeat,
                        precision=args.precision,
                        average_from=args.average_from,
                        jit_compile=args.jit_compile,
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
        "jit_compile": args.jit_compile,
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
