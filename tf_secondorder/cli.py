"""The `tf-secondorder` command."""

import argparse
import json
import os
import platform
import sys


def _parse_options(pairs):
    options = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


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
        raise ValueError(
            f"`replicas`={replicas} needs that many devices; TensorFlow was "
            f"already initialised with {len(devices)} CPU devices."
        )
    return tf.distribute.MirroredStrategy(devices[:replicas])


def bench(args):
    import keras
    import tensorflow as tf

    from tf_secondorder import __version__
    from tf_secondorder.bench import runner, tasks

    if args.replicas < 1:
        raise ValueError(
            f"`replicas` must be an integer >= 1. Received: replicas={args.replicas}"
        )
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for name in names:
        runner.parse_name(name)  # fail before any training
    strategy = _logical_strategy(args.replicas) if args.replicas > 1 else None
    try:
        task = tasks.get_task(args.task, args.steps)
    except tasks.TaskUnavailable as e:
        print(f"tf-secondorder bench: {e}", file=sys.stderr)
        return 2
    if args.eval_every is not None:
        if not 1 <= args.eval_every <= task.steps or task.steps % args.eval_every:
            raise ValueError(
                "`eval_every` must be an integer between 1 and the number of "
                f"steps ({task.steps}) that divides it. "
                f"Received: eval_every={args.eval_every}"
            )
        task.eval_every = args.eval_every
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else list(task.lrs)
    shampoo_options = _parse_options(args.shampoo_option)
    results = []
    for name in names:
        for lr in lrs:
            print(f"== {task.name}: {name} lr={lr:g}", flush=True)
            options = shampoo_options if name.split("+")[0] == "shampoo" else None
            results.append(
                runner.run(
                    task,
                    name,
                    lr,
                    options,
                    seed=args.seed,
                    verbose=args.verbose,
                    strategy=strategy,
                )
            )
    summary = runner.summarize(task, results)
    summary["metric"] = task.info.get("metric", "loss")
    print(runner.format_table(summary, results))
    report = {
        **summary,
        "steps": task.steps,
        "eval_every": task.eval_every,
        "replicas": args.replicas,
        "command": " ".join(["tf-secondorder"] + sys.argv[1:]),
        "versions": {
            "tf_secondorder": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
        "task_info": task.info,
        "runs": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    plots = runner.plot(summary, results, args.out)
    print(f"wrote {os.path.join(args.out, 'results.json')}, " + ", ".join(plots))
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
    parser = argparse.ArgumentParser(prog="tf-secondorder")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="train optimizers on a benchmark task and compare")
    b.add_argument(
        "--task",
        default="digits-ae",
        help="digits-ae (T1), pydoc-lm (T2), or the TFDS tasks mnist, cifar10",
    )
    b.add_argument(
        "--optimizers",
        default="adam,shampoo",
        help="comma-separated: adam, adamw, sgd, lion, muon, shampoo, soap, "
        "signsgd, each optionally +COMPRESSOR (e.g. shampoo+sign)",
    )
    b.add_argument(
        "--lrs", default=None, help="comma-separated; default: the task's grid"
    )
    b.add_argument("--steps", type=int, default=None)
    b.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between task-loss evaluations; default: the task's "
        "(50 for digits-ae, 100 for pydoc-lm)",
    )
    b.add_argument("--seed", type=int, default=0)
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
        help="Shampoo argument for this run, e.g. precondition_frequency=50",
    )
    b.add_argument("--out", default="bench_out")
    b.add_argument(
        "--verbose", type=int, default=1, help="Keras progress bar (0, 1, 2)"
    )
    b.set_defaults(func=bench)
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


if __name__ == "__main__":
    sys.exit(main())
