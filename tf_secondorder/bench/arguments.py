"""Reads and checks the `tf-secondorder bench` arguments.

Every check raises UsageError naming the argument, so that a bad value stops
the command before the first run starts rather than partway through the grid.
"""

import math
import os

from tf_secondorder.bench.usage import UsageError, usage_error

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def _parse_optimizers(text):
    # Deferred: optimizers imports TensorFlow, which `--help` does not need.
    from tf_secondorder.bench import optimizers

    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise usage_error(
            "optimizers",
            "a comma-separated list of optimizer names, e.g. adam,shampoo",
            repr(text),
        )
    for name in names:
        if not name:
            raise usage_error(
                "optimizers", "comma-separated names without empty entries", repr(text)
            )
        try:
            optimizers.parse_name(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise usage_error(
            "optimizers",
            "distinct names (use --repeats to run one several times)",
            f"{text!r}, which repeats {repeated}",
        )
    return names


def _parse_lrs(text, argument="lrs"):
    expected = "comma-separated finite numbers > 0, e.g. 1e-3,3e-3"
    lrs = []
    for entry in text.split(","):
        try:
            lr = float(entry)
        except ValueError:
            raise usage_error(argument, expected, f"{text!r}") from None
        if not math.isfinite(lr) or lr <= 0:
            raise usage_error(argument, expected, f"{text!r} (entry {entry.strip()!r})")
        lrs.append(lr)
    if len(set(lrs)) < len(lrs):
        raise usage_error(argument, "distinct learning rates", repr(text))
    return lrs


def parse_lrs_of(entries, names):
    """{name: its own learning rates} from `--lrs-of NAME:LR,LR,...` entries;
    NAME is one of `names` (the --optimizers entries), once each."""
    grids = {}
    for entry in entries or []:
        name, colon, text = entry.partition(":")
        if not colon or name not in names:
            raise usage_error(
                "lrs_of", f"NAME:LR,LR,... with NAME one of {names}", repr(entry)
            )
        if name in grids:
            raise usage_error("lrs_of", "one entry per optimizer", repr(entry))
        grids[name] = _parse_lrs(text, argument="lrs_of")
    return grids


def _largest_divisor_up_to(steps, limit):
    return max(d for d in range(1, min(steps, limit) + 1) if steps % d == 0)


def schedule(task_name, steps, eval_every):
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
        raise usage_error(
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


def check_bench_args(args):
    """Every check that needs no data and no TensorFlow device; raises UsageError.

    Returns (names, lrs, steps, eval_every, note, (options, sources)), the
    last as `options.parse` returns them."""
    from tf_secondorder.bench import tasks

    try:
        tasks.check_name(args.task)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.replicas < 1:
        raise usage_error("replicas", "an integer >= 1", args.replicas)
    if args.repeats < 1:
        raise usage_error("repeats", "an integer >= 1", args.repeats)
    if args.verbose not in (0, 1, 2):
        raise usage_error("verbose", "0, 1 or 2", args.verbose)
    if args.batch_schedule is not None:
        from tf_secondorder.bench import batch_schedules

        batch_schedules.parse(args.batch_schedule, args.replicas)
    if args.samples is not None and args.samples < 1:
        raise usage_error("samples", "an integer >= 1", args.samples)
    if args.precision not in PRECISIONS:
        raise usage_error(
            "precision", f"one of {list(PRECISIONS)}", repr(args.precision)
        )
    if getattr(args, "jit_compile", False) and args.replicas > 1:
        raise usage_error(
            "jit_compile", "used with --replicas 1", f"--replicas {args.replicas}"
        )
    names = _parse_optimizers(args.optimizers)
    lrs = _parse_lrs(args.lrs) if args.lrs is not None else None
    steps, eval_every, note = schedule(args.task, args.steps, args.eval_every)
    from tf_secondorder.bench import options

    parsed = options.parse(args.option, args.shampoo_option, names)
    if parsed[0] and args.batch_schedule is not None:
        argument = "option" if args.option else "shampoo_option"
        raise usage_error(
            argument,
            "left out with `batch_schedule`, whose runs use the library defaults",
            args.option or args.shampoo_option,
        )
    for name, path in (("out", args.out), ("data_dir", args.data_dir)):
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise usage_error(name, "a directory", f"{path!r}, which is a file")
    return names, lrs, steps, eval_every, note, parsed


def logical_strategy(replicas):
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
        raise usage_error(
            "replicas",
            f"at most the {len(devices)} CPU devices TensorFlow was already "
            "initialised with",
            replicas,
        )
    return tf.distribute.MirroredStrategy(devices[:replicas])
