"""The `tf-secondorder` command."""

import argparse
import json
import math
import os
import platform
import sys


class UsageError(ValueError):
    """An invalid command-line argument, found before any work starts.

    `console` (the `tf-secondorder` command) prints it and exits with code 2;
    `main` raises it, so callers see a ValueError naming the argument.
    """


def _usage(name, expected, received):
    return UsageError(f"`{name}` must be {expected}; received {received}")


def _shampoo_arguments():
    """Names tfso.Shampoo accepts: the named arguments of every `__init__` its
    keyword arguments reach (down to Keras's optimizer) and the communication
    options (the fields of the package's CommunicationConfig dataclass)."""
    import dataclasses
    import inspect

    import tf_secondorder as tfso

    names = set()
    for cls in inspect.getmro(tfso.Shampoo):
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(vars(cls)["__init__"]).parameters.values()
        for p in parameters:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                names.add(p.name)
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break  # keywords are not passed on past this class
    config = getattr(tfso, "CommunicationConfig", None)
    if config is not None and dataclasses.is_dataclass(config):
        names.update(f.name for f in dataclasses.fields(config))
    # The learning rate comes from --lrs; "self" and "name" are not options.
    return sorted(names - {"self", "learning_rate", "name"})


def _parse_options(pairs):
    """`KEY=VALUE` strings -> {key: JSON value (or the string)}, keys checked."""
    import difflib

    options = {}
    accepted = None
    for pair in pairs or []:
        key, equals, value = pair.partition("=")
        key = key.strip()
        if not equals or not key:
            raise _usage(
                "shampoo_option",
                "KEY=VALUE (e.g. precondition_frequency=50)",
                repr(pair),
            )
        if accepted is None:
            accepted = _shampoo_arguments()
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            learning_rate = (
                " (learning rates come from --lrs)" if key == "learning_rate" else ""
            )
            raise _usage(
                "shampoo_option",
                f"KEY=VALUE with KEY an argument of tfso.Shampoo: {accepted}",
                f"{key!r}{hint}{learning_rate}",
            )
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _parse_optimizers(text):
    from tf_secondorder.bench import runner

    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise _usage(
            "optimizers",
            "a comma-separated list of optimizer names, e.g. adam,shampoo",
            repr(text),
        )
    for name in names:
        if not name:
            raise _usage(
                "optimizers", "comma-separated names without empty entries", repr(text)
            )
        try:
            runner.parse_name(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise _usage(
            "optimizers",
            "distinct names (use --repeats to run one several times)",
            f"{text!r}, which repeats {repeated}",
        )
    return names


def _parse_lrs(text):
    expected = "comma-separated finite numbers > 0, e.g. 1e-3,3e-3"
    lrs = []
    for entry in text.split(","):
        try:
            lr = float(entry)
        except ValueError:
            raise _usage("lrs", expected, f"{text!r}") from None
        if not math.isfinite(lr) or lr <= 0:
            raise _usage("lrs", expected, f"{text!r} (entry {entry.strip()!r})")
        lrs.append(lr)
    if len(set(lrs)) < len(lrs):
        raise _usage("lrs", "distinct learning rates", repr(text))
    return lrs


def _largest_divisor_up_to(steps, limit):
    return max(d for d in range(1, min(steps, limit) + 1) if steps % d == 0)


def _schedule(task_name, steps, eval_every):
    """(steps, eval_every, note): checked, with eval_every's default filled in.

    `eval_every` defaults to the task's own interval when it divides `steps`,
    else to the largest divisor of `steps` below that interval, so that
    exactly `steps` steps are trained and the last one is evaluated.
    """
    from tf_secondorder.bench import tasks

    default_steps, default_every = tasks.default_schedule(task_name)
    if steps is None:
        steps = default_steps
    if steps < 2:
        raise _usage(
            "steps",
            "an integer >= 2 (step 1 traces the train step and is left out of "
            "the step-time statistics)",
            steps,
        )
    if eval_every is not None:
        if not 1 <= eval_every <= steps or steps % eval_every:
            raise UsageError(
                "`eval_every` must be an integer between 1 and the number of "
                f"steps ({steps}) that divides it; received eval_every={eval_every}"
            )
        return steps, eval_every, None
    every = _largest_divisor_up_to(steps, default_every)
    note = None
    if every != default_every:
        note = (
            f"evaluating every {every} steps: the largest divisor of --steps "
            f"{steps} up to {task_name}'s {default_every} (set --eval-every to "
            "choose)"
        )
    return steps, every, note


def _check_bench_args(args):
    """Every check that needs no data and no TensorFlow device; raises UsageError."""
    from tf_secondorder.bench import tasks

    try:
        tasks.check_name(args.task)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.replicas < 1:
        raise _usage("replicas", "an integer >= 1", args.replicas)
    if args.repeats < 1:
        raise _usage("repeats", "an integer >= 1", args.repeats)
    if args.verbose not in (0, 1, 2):
        raise _usage("verbose", "0, 1 or 2", args.verbose)
    names = _parse_optimizers(args.optimizers)
    lrs = _parse_lrs(args.lrs) if args.lrs is not None else None
    steps, eval_every, note = _schedule(args.task, args.steps, args.eval_every)
    options = _parse_options(args.shampoo_option)
    if options and not any(n.split("+")[0] == "shampoo" for n in names):
        raise _usage(
            "shampoo_option",
            "given only when `optimizers` includes shampoo",
            f"{args.shampoo_option} with optimizers={args.optimizers!r}",
        )
    for name, path in (("out", args.out), ("data_dir", args.data_dir)):
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise _usage(name, "a directory", f"{path!r}, which is a file")
    return names, lrs, steps, eval_every, note, options


def _check_optimizers(names, lrs, options, strategy):
    """Builds every configuration's optimizer once, so that a bad option value
    fails here, before the first run, rather than when its run starts."""
    from tf_secondorder.bench import runner

    with strategy.scope() if strategy is not None else runner._no_scope():
        for name in names:
            shampoo = name.split("+")[0] == "shampoo"
            for lr in lrs:
                try:
                    runner.make_optimizer(name, lr, options if shampoo else None)
                except (ValueError, TypeError) as e:
                    argument = "shampoo_option" if shampoo and options else "lrs"
                    raise UsageError(
                        f"`{argument}`: {name} at learning rate {lr:g} with "
                        f"{options if shampoo else {}} is rejected: {e}"
                    ) from None


def _logical_strategy(replicas):
    """A MirroredStrategy over `replicas` logical CPUs (or all GPUs if as many)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= replicas:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(replicas)])
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    except RuntimeError:
        pass  # TensorFlow already initialised: use the logical CPUs it has
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < replicas:
        raise _usage(
            "replicas",
            f"at most the {len(devices)} CPU devices TensorFlow was already "
            "initialised with",
            replicas,
        )
    return tf.distribute.MirroredStrategy(devices[:replicas])


def bench(args):
    names, lrs, steps, eval_every, note, shampoo_options = _check_bench_args(args)

    import keras
    import tensorflow as tf

    from tf_secondorder import __version__
    from tf_secondorder.bench import runner, tasks

    strategy = _logical_strategy(args.replicas) if args.replicas > 1 else None
    try:
        task = tasks.get_task(args.task, steps, data_dir=args.data_dir)
    except tasks.TaskUnavailable as e:
        print(f"tf-secondorder bench: {e}", file=sys.stderr)
        return 2
    task.eval_every = eval_every
    if note:
        print(f"tf-secondorder bench: {note}", flush=True)
    lrs = lrs if lrs is not None else list(task.lrs)
    _check_optimizers(names, lrs, shampoo_options, strategy)
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
                    )
                )
    summaries = [
        runner.summarize(task, [r for r in results if r["repeat"] == repeat])
        for repeat in range(args.repeats)
    ]
    summary = dict(summaries[0])
    summary["metric"] = task.info.get("metric", "loss")
    summary["seeds"] = seeds
    configurations = runner.aggregate(results)
    print(runner.format_table(summary, results, configurations))
    report = {
        **summary,
        "steps": task.steps,
        "eval_every": task.eval_every,
        "replicas": args.replicas,
        "repeats": args.repeats,
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
        json.dump(report, f, indent=1)
    plots = runner.plot(summary, results, args.out)
    print(f"wrote {os.path.join(args.out, 'results.json')}, " + ", ".join(plots))
    return 0


def prepare_data(args):
    """Builds the bench's offline TFDS datasets into the data dir."""
    if args.data_dir is not None and os.path.isfile(args.data_dir):
        raise _usage("data_dir", "a directory", f"{args.data_dir!r}, which is a file")
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
    try:
        return launcher.launch(
            command,
            workers=args.workers,
            rate=args.rate,
            timeout=args.timeout,
            max_restarts=args.max_restarts,
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
        "(byte-level Transformer on CPython's pydoc text): both built as TFDS "
        "datasets on this machine; or mnist, cifar10: TFDS datasets already "
        "prepared in the data dir",
    )
    b.add_argument(
        "--optimizers",
        default="adam,shampoo",
        help="comma-separated, distinct: adam, adamw, sgd, lion, muon, shampoo, "
        "soap, signsgd, each optionally +COMPRESSOR (e.g. shampoo+sign)",
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
        "digits-ae and pydoc-lm build their datasets there on first use",
    )
    b.add_argument(
        "--out", default="bench_out", help="directory for results.json and plots"
    )
    b.add_argument(
        "--verbose", type=int, default=1, help="Keras progress bar (0, 1, 2)"
    )
    b.set_defaults(func=bench)
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
