"""`tf-secondorder multiworker`: multi-worker step time and time-to-target
over a rate-limited network.

    tf-secondorder multiworker                                  # full grid
    tf-secondorder multiworker --workers 2 --rates 1gbit \
        --settings fp32,sign --steps 40

For every (workers, rate) it launches real worker processes with
`tf-secondorder launch --rate` (a private network namespace whose loopback is
shaped by tc; needs root) and trains a communication-bound model, a
64-2048-2048-2048-10 MLP (8.5 M parameters) on scikit-learn digits at 8
examples per worker per step (`--batch-per-worker`), with `tfso.distributed(Adam)` and each
compression setting. Worker 0 records the wall time of every step and the
mean training loss of every 10-step window. Printed ratios are against
uncompressed float32 measured in the same (workers, rate) group.

Time-to-target counts from the start of `fit` (tracing and the first
steps included) to the end of the first 10-step window whose mean loss is
at or below `--target`. Runs whose time-to-target is longer than
`--max-seconds` stop there; their time-to-target is then "> max-seconds".
"""

import argparse
import json
import os
import sys
import time

from tf_secondorder.bench.multiworker_worker import SETTINGS
from tf_secondorder.bench.usage import usage_error


def register(subparsers):
    """Adds `multiworker` to the `tf-secondorder` subcommands."""
    parser = subparsers.add_parser(
        "multiworker",
        help="multi-worker step time and time-to-target over a rate-limited "
        "network (--rates needs root)",
        description=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workers", default="2,4", help="comma-separated worker counts"
    )
    parser.add_argument(
        "--rates",
        default="1gbit,100mbit",
        help="comma-separated tc rates of the workers' network, or none "
        "(no namespace, no root needed)",
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"comma-separated, among {', '.join(SETTINGS)} (default: all)",
    )
    parser.add_argument("--steps", type=int, default=300, help="steps per run")
    parser.add_argument(
        "--target", type=float, default=0.1, help="training loss of time-to-target"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=1e-4, help="Adam's and the others'"
    )
    parser.add_argument(
        "--sign-learning-rate", type=float, default=1e-4, help="SignSGD's"
    )
    parser.add_argument("--batch-per-worker", type=int, default=8)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=600,
        help="stop a run after this many seconds of training",
    )
    parser.add_argument(
        "--short-rates",
        default="100mbit",
        help="rates at which fp32 runs only --short-steps (its step time alone)",
    )
    parser.add_argument("--short-steps", type=int, default=10)
    parser.add_argument(
        "--tmp",
        default="/tmp/tfso_multiworker_bench",
        help="directory for each run's record",
    )
    parser.add_argument(
        "--out", default="multiworker_results.json", help="JSON of every row"
    )
    parser.add_argument("--verbose", action="store_true", help="workers' output")
    parser.add_argument("--profile", default=None, help="TF profiler dir (worker 0)")
    parser.set_defaults(func=command)
    return parser


def command(args):
    """Runs `tf-secondorder multiworker`; invalid arguments raise UsageError."""
    from tf_secondorder.distribute import launch as launcher

    check(args, launcher)
    return driver(args)


def check(args, launcher):
    """Every check before the first worker starts; raises UsageError."""
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        workers = []
    if not workers or min(workers) < 1:
        raise usage_error(
            "workers", "comma-separated integers >= 1, e.g. 2,4", repr(args.workers)
        )
    for name in ("rates", "short_rates"):
        for rate in getattr(args, name).split(","):
            if rate != "none":
                try:
                    launcher.rate_bits_per_second(rate)
                except ValueError:
                    raise usage_error(
                        name,
                        "comma-separated tc rates (e.g. 1gbit,100mbit) or none",
                        repr(getattr(args, name)),
                    ) from None
    unknown = sorted(set(args.settings.split(",")) - set(SETTINGS))
    if unknown:
        raise usage_error(
            "settings", f"comma-separated names among {sorted(SETTINGS)}", unknown
        )
    for name in ("steps", "short_steps", "batch_per_worker"):
        if getattr(args, name) < 1:
            raise usage_error(name, "an integer >= 1", getattr(args, name))
    for name in ("learning_rate", "sign_learning_rate", "max_seconds"):
        value = getattr(args, name)
        if not 0 < value < float("inf"):
            raise usage_error(name, "a finite number > 0", value)
    if os.path.isdir(args.out):
        raise usage_error("out", "a file path", f"{args.out!r}, which is a directory")


def summarize(result, target, skip=3):
    ends = result["step_ends"]
    times = [b - a for a, b in zip(ends[skip:], ends[skip + 1 :])]
    times.sort()
    median = times[len(times) // 2] if times else float("nan")
    reached = [w for w in result["windows"] if target is not None and w[2] <= target]
    return {
        "step_s": median,
        "steps": len(ends),
        "final_loss": result["windows"][-1][2] if result["windows"] else None,
        "steps_to_target": reached[0][0] if reached else None,
        "time_to_target_s": reached[0][1] if reached else None,
        "elapsed_s": ends[-1] if ends else None,
    }


def driver(args):
    import tf_secondorder
    from tf_secondorder.distribute import launch as launcher

    os.makedirs(args.tmp, exist_ok=True)
    # The workers import this same package, wherever it was imported from.
    root = os.path.dirname(os.path.dirname(os.path.abspath(tf_secondorder.__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for rate in args.rates.split(","):
            for setting in args.settings.split(","):
                result = os.path.join(args.tmp, f"{workers}-{rate}-{setting}.json")
                steps = args.steps
                if setting == "fp32" and rate in args.short_rates.split(","):
                    steps = args.short_steps
                command = [
                    sys.executable,
                    "-m",
                    "tf_secondorder.bench.multiworker_worker",
                ]
                command += ["--setting", setting, "--result", result]
                command += [
                    "--steps",
                    str(steps),
                    "--max-seconds",
                    str(args.max_seconds),
                ]
                command += ["--learning-rate", str(args.learning_rate)]
                command += ["--sign-learning-rate", str(args.sign_learning_rate)]
                command += ["--batch-per-worker", str(args.batch_per_worker)]
                if args.profile:
                    command += ["--profile", os.path.join(args.profile, setting)]
                if args.target is not None and steps == args.steps:
                    command += ["--target", str(args.target)]
                print(f"== {workers} workers, {rate}, {setting}", flush=True)
                started = time.perf_counter()
                code = launcher.launch(
                    command,
                    workers=workers,
                    rate=None if rate == "none" else rate,
                    timeout=args.max_seconds + 300,
                    out=open(os.devnull, "w") if not args.verbose else None,
                    env=env,
                )
                if code == 130:
                    print("   interrupted; stopping", flush=True)
                    return 130
                if code != 0:
                    print(f"   failed with exit code {code}", flush=True)
                    continue
                with open(result) as f:
                    raw = json.load(f)
                row = {"workers": workers, "rate": rate, **raw}
                row.update(summarize(raw, args.target if steps == args.steps else None))
                row["wall_s"] = time.perf_counter() - started
                rows.append(row)
                print(
                    f"   step {row['step_s'] * 1e3:.0f} ms, bytes/step "
                    f"{row['bytes_per_step']:.3g}, final loss {row['final_loss']:.4f}, "
                    f"time to target {row['time_to_target_s']}",
                    flush=True,
                )
    add_ratios(rows)
    print(table(rows, args.target))
    with open(args.out, "w") as f:
        json.dump(
            {
                "command": " ".join(["tf-secondorder"] + sys.argv[1:]),
                "target": args.target,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


def add_ratios(rows):
    for row in rows:
        base = [
            r
            for r in rows
            if r["setting"] == "fp32"
            and (r["workers"], r["rate"]) == (row["workers"], row["rate"])
        ]
        base = base[0] if base else None
        row["fp32_step_over_this"] = base["step_s"] / row["step_s"] if base else None
        row["bytes_ratio"] = row["float32_bytes_per_step"] / max(
            row["bytes_per_step"], 1
        )
        both = base and base["time_to_target_s"] and row["time_to_target_s"]
        row["time_to_target_vs_fp32"] = (
            row["time_to_target_s"] / base["time_to_target_s"] if both else None
        )


def _fmt(value, pattern, missing="—"):
    return missing if value is None else pattern.format(value)


def table(rows, target):
    lines = [
        "| workers | rate | setting | MB/step (fp32 / this) | step ms | "
        f"fp32 step / this | steps to loss {target} | time to target s | "
        "vs fp32 | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['rate']} | {r['setting']} | "
            f"{r['bytes_per_step'] / 1e6:.3g} (1/{r['bytes_ratio']:.1f}) | "
            f"{r['step_s'] * 1e3:.0f} | {_fmt(r['fp32_step_over_this'], '{:.2f}×')} | "
            f"{_fmt(r['steps_to_target'], '{}')} | "
            f"{_fmt(r['time_to_target_s'], '{:.0f}')} | "
            f"{_fmt(r['time_to_target_vs_fp32'], '{:.2f}×')} | "
            f"{_fmt(r['final_loss'], '{:.4f}')} |"
        )
    return "\n".join(lines)
