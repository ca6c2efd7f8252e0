"""The `tf-secondorder` command: assembles the subcommands, each defined
next to its implementation (`register(subparsers)`): bench
(tf_secondorder/bench/command.py), scale (bench/scale.py), bytes
(bench/communication_bytes.py), multiworker (bench/multiworker.py); and
prepare-data and launch here."""

import argparse
import os
import sys

from tf_secondorder.bench import command as bench_command
from tf_secondorder.bench import communication_bytes, multiworker, scale
from tf_secondorder.bench.usage import UsageError, usage_error


def prepare_data(args):
    """Builds the bench's offline TFDS datasets into the data dir."""
    if args.data_dir is not None and os.path.isfile(args.data_dir):
        raise usage_error(
            "data_dir", "a directory", f"{args.data_dir!r}, which is a file"
        )
    from tf_secondorder.bench import tasks

    try:
        tasks.tfds_module()
    except tasks.TaskUnavailable as e:
        print(f"tf-secondorder prepare-data: {e}", file=sys.stderr)
        return 2
    from tf_secondorder.bench import tfds_builders

    for name, builder in tfds_builders.prepare(args.data_dir, announce=False).items():
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
    bench_command.register(sub)
    scale.register(sub)
    communication_bytes.register(sub)
    multiworker.register(sub)
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
