"""PyTorch peers (torch Adam, heavyball Shampoo/SOAP) on the digits-ae task.

An optional side-by-side reference, not part of the package: it needs only
torch, heavyball, scikit-learn and numpy (no TensorFlow), so run it from a
separate virtual environment:

    python -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0 heavyball scikit-learn numpy
    nice -n 10 /work/peer-venv/bin/python tools/peer_bench.py \
        --repeats 3 --out peer_results.json

The task copies `tf_secondorder.bench.tasks.digits_ae.digits_autoencoder`: X =
load_digits().data / 16 as float32 (1797 x 64); Dense 64-512-256-128-16-128-
256-512-64, tanh hidden layers, a linear 16-unit code, a sigmoid output;
glorot_uniform weights and zero biases (Keras defaults); MSE loss; batch 128
drawn from a seeded reshuffle each epoch (remainder dropped); full-data MSE
every 50 steps; 2000 steps. See tools/README.md for what it measures.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time

import numpy as np

WIDTHS = [512, 256, 128, 16, 128, 256, 512]
DEFAULT_OPTIMIZERS = "adam,KLShampoo,SOAP"
BASELINE = "adam"
# --compile-mode -> heavyball.utils.compile_mode (None: run eagerly).
COMPILE_MODES = {
    "heavyball": "max-autotune-no-cudagraphs",
    "default": "default",
    "none": None,
}
RATIOS = (
    "steps_ratio",
    "step_time_ratio",
    "mean_step_time_ratio",
    "time_ratio",
    "time_ratio_excl_first",
    "paired_step_time_ratio",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--lrs",
        default="3e-4,1e-3,3e-3",
        help="comma-separated learning rates, tried for every optimizer",
    )
    parser.add_argument(
        "--optimizers",
        default=DEFAULT_OPTIMIZERS,
        help="comma-separated: 'adam' (torch.optim.Adam with Keras's defaults) "
        "and heavyball optimizer class names (e.g. KLShampoo, HeavyKLShampoo, "
        "SOAP, HeavySOAP), used with heavyball's defaults except lr. 'adam' "
        "is required unless --target is given.",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the whole grid R times, interleaved (adam, shampoo, soap, "
        "adam, ...), and report the median and min-max of each ratio",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="loss target (e.g. our Keras Adam's best final loss); default: "
        "the best torch-Adam final loss of this run of the tool",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--seed", type=int, default=0, help="model initialisation and data order"
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=3,
        help="untimed steps of each optimizer before the grid, so the first "
        "measured run does not pay the process's one-off costs (library "
        "loading, and with --compile-mode default most compiling); 0: none",
    )
    parser.add_argument(
        "--compile-mode",
        choices=sorted(COMPILE_MODES),
        default="none",
        help="how heavyball's fused kernels run: 'none' = eagerly; 'default' = "
        "through torch.compile's default mode (minutes of compiling, spread "
        "over the first steps of each run's new shapes); 'heavyball' = its "
        "own default, torch.compile mode max-autotune-no-cudagraphs, which "
        "fails on CPU with torch 2.13 (inductor's C++ GEMM template)",
    )
    parser.add_argument("--out", default=None, help="write all results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no per-run lines")
    args = parser.parse_args(argv)
    args.lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    args.optimizers = [v.strip() for v in args.optimizers.split(",") if v.strip()]
    if args.steps < args.eval_every or args.steps % args.eval_every:
        parser.error("--steps must be a positive multiple of --eval-every")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if BASELINE not in [n.lower() for n in args.optimizers] and args.target is None:
        parser.error("'adam' must be among --optimizers unless --target is given")
    return args


def load_digits_x():
    from sklearn.datasets import load_digits

    return (load_digits().data / 16.0).astype("float32")


def make_model(seed):
    """The Keras digits autoencoder in torch: glorot_uniform weights, zero biases."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers, width_in = [], 64
    for width in WIDTHS:
        layers.append(nn.Linear(width_in, width))
        if width != 16:  # the 16-unit code is linear
            layers.append(nn.Tanh())
        width_in = width
    layers += [nn.Linear(width_in, 64), nn.Sigmoid()]
    model = nn.Sequential(*layers)
    for module in model:
        if isinstance(module, nn.Linear):
            # Keras's glorot_uniform: U(+-sqrt(6 / (fan_in + fan_out))).
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def batch_indices(n, batch_size, steps, seed):
    """Each epoch a fresh seeded permutation, cut into full batches."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    out = []
    while len(out) < steps:
        order = rng.permutation(n)
        out.extend(
            order[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)
        )
    return np.stack(out[:steps])


def heavyball_class(name):
    import heavyball
    import torch

    names = getattr(heavyball, "__all__", dir(heavyball))
    by_lower = {
        k.lower(): getattr(heavyball, k)
        for k in names
        if isinstance(getattr(heavyball, k, None), type)
        and issubclass(getattr(heavyball, k), torch.optim.Optimizer)
        and k not in ("SplitOpt", "SAMWrapper")  # wrappers, not optimizers
    }
    if name.lower() not in by_lower:
        raise SystemExit(
            f"unknown optimizer {name!r}: use 'adam' or a heavyball optimizer "
            f"class ({', '.join(sorted(c.__name__ for c in by_lower.values()))})"
        )
    return by_lower[name.lower()]


def make_optimizer(name, params, lr):
    import torch

    if name == BASELINE:
        # Keras Adam's defaults. (Keras adds epsilon to sqrt(v) before bias
        # correction, torch after; at 1e-7 the difference is negligible.)
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-7)
    return heavyball_class(name)(params, lr=lr)


def optimizer_settings(optimizer):
    """The hyperparameters the optimizer was built with (its `defaults`)."""
    out = {}
    for key, value in optimizer.defaults.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, (tuple, list)):
            value = [
                v if isinstance(v, (bool, int, float, str)) else repr(v) for v in value
            ]
        elif not isinstance(value, (bool, int, float, str, type(None))):
            value = repr(value)
        out[key] = value
    # heavyball's SOAP family moves these out of `defaults` into attributes.
    schedule = getattr(optimizer, "precond_schedule", None)
    if isinstance(schedule, (int, float)) and schedule > 0:
        out["precondition_frequency"] = round(1 / schedule)
    elif schedule is not None:
        out["precond_schedule"] = repr(schedule)
    for key in ("compile_step", "promote"):
        if isinstance(getattr(optimizer, key, None), bool):
            out[key] = getattr(optimizer, key)
    return out


def train(name, lr, x, batches, args):
    """One run: per-step wall times and the full-data MSE every eval_every steps."""
    import torch
    import torch.nn.functional as F

    model = make_model(args.seed)
    optimizer = make_optimizer(name, list(model.parameters()), lr)
    full = torch.from_numpy(x)
    step_times, curve, curve_seconds = [], [], []
    train_seconds = 0.0
    for step in range(1, args.steps + 1):
        xb = full[batches[step - 1]]
        start = time.perf_counter()
        loss = F.mse_loss(model(xb), xb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        step_times.append(elapsed)
        train_seconds += elapsed
        if step % args.eval_every == 0:
            with torch.no_grad():
                value = float(F.mse_loss(model(full), full))
            curve.append([step, value])
            curve_seconds.append(train_seconds)
    times = np.array(step_times)
    return {
        "optimizer": name,
        "class": type(optimizer).__module__ + "." + type(optimizer).__qualname__,
        "learning_rate": lr,
        "settings": optimizer_settings(optimizer),
        "curve": curve,
        "curve_seconds": curve_seconds,
        "final_loss": curve[-1][1],
        "finite": bool(np.isfinite(curve[-1][1])),
        # Step 1 includes any compilation and first preconditioner work.
        "first_step_seconds": float(times[0]),
        "median_step_seconds": float(np.median(times[1:])),
        "mean_step_seconds": float(np.mean(times[1:])),
        "train_seconds": float(train_seconds),
    }


def warm(name, lr, x, batches, args):
    """A few untimed steps on a throwaway model (loads kernels and libraries)."""
    import torch
    import torch.nn.functional as F

    model = make_model(args.seed)
    optimizer = make_optimizer(name, list(model.parameters()), lr)
    full = torch.from_numpy(x)
    for step in range(min(args.warmup_steps, len(batches))):
        xb = full[batches[step]]
        F.mse_loss(model(xb), xb).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        F.mse_loss(model(full), full)


def to_target(run, target):
    """First evaluated step with loss <= target, and training seconds to it
    (with and without step 1)."""
    for (step, loss), seconds in zip(run["curve"], run["curve_seconds"]):
        if loss <= target:
            return step, seconds, seconds - run["first_step_seconds"]
    return None, None, None


def pick_baseline(runs, target, external):
    """The torch-Adam run the ratios divide by.

    Own target: the Adam run with the lowest final loss (as the project's
    runner). External target: the Adam run reaching it in the fewest steps,
    else the lowest final loss.
    """
    adam = [r for r in runs if r["optimizer"] == BASELINE and r["finite"]]
    if not adam:
        return None
    best_final = min(adam, key=lambda r: r["final_loss"])
    if external:
        reaching = [r for r in adam if r["steps_to_target"] is not None]
        if reaching:
            return min(reaching, key=lambda r: (r["steps_to_target"], r["final_loss"]))
    return best_final


def ratio(a, b):
    return a / b if a is not None and b else None


def summarize_repeat(runs, args):
    """Target, steps/time-to-target and ratios for one repeat's runs, in place."""
    adam = [r for r in runs if r["optimizer"] == BASELINE and r["finite"]]
    if args.target is not None:
        target = args.target
    elif adam:
        target = min(r["final_loss"] for r in adam)
    else:  # every Adam run diverged: nothing to measure against
        target = float("-inf")
    for r in runs:
        r["target"] = target
        (
            r["steps_to_target"],
            r["seconds_to_target"],
            r["seconds_to_target_excl_first"],
        ) = to_target(r, target)
    base = pick_baseline(runs, target, args.target is not None)
    for r in runs:
        if base is None:
            for key in RATIOS:
                r[key] = None
            continue
        r["baseline_lr"] = base["learning_rate"]
        r["steps_ratio"] = ratio(r["steps_to_target"], base["steps_to_target"])
        r["step_time_ratio"] = ratio(
            r["median_step_seconds"], base["median_step_seconds"]
        )
        r["mean_step_time_ratio"] = ratio(
            r["mean_step_seconds"], base["mean_step_seconds"]
        )
        r["time_ratio"] = ratio(r["seconds_to_target"], base["seconds_to_target"])
        r["time_ratio_excl_first"] = ratio(
            r["seconds_to_target_excl_first"], base["seconds_to_target_excl_first"]
        )
        # Against the Adam run of the same lr and repeat, which ran just
        # before it: less exposed to drift in the machine's load.
        paired = [
            a
            for a in runs
            if a["optimizer"] == BASELINE and a["learning_rate"] == r["learning_rate"]
        ]
        r["paired_step_time_ratio"] = (
            ratio(r["median_step_seconds"], paired[0]["median_step_seconds"])
            if paired
            else None
        )
    return target, (base["learning_rate"] if base else None)


def spread(values):
    """median, min, max of the non-None values (None if there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": float(np.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def aggregate(runs, args):
    """One row per (optimizer, lr) over the repeats."""
    rows = []
    for name in args.optimizers:
        for lr in args.lrs:
            mine = [
                r for r in runs if r["optimizer"] == name and r["learning_rate"] == lr
            ]
            if not mine:
                continue
            finals = [r["final_loss"] for r in mine]
            row = {
                "optimizer": name,
                "class": mine[0]["class"],
                "learning_rate": lr,
                "repeats": len(mine),
                "final_loss": spread(finals),
                "steps_to_target": spread([r["steps_to_target"] for r in mine]),
                "reached_target": sum(r["steps_to_target"] is not None for r in mine),
                "first_step_seconds": spread([r["first_step_seconds"] for r in mine]),
                "median_step_seconds": spread([r["median_step_seconds"] for r in mine]),
                "mean_step_seconds": spread([r["mean_step_seconds"] for r in mine]),
            }
            for key in RATIOS:
                row[key] = spread([r[key] for r in mine])
            rows.append(row)
    return rows


def fmt_spread(s, spec, show_range=True):
    if s is None:
        return "-"
    text = format(s["median"], spec)
    if show_range and s["n"] > 1:
        text += f" [{format(s['min'], spec)}-{format(s['max'], spec)}]"
    return text


def format_table(rows, header):
    cols = [
        ("optimizer", lambda r: r["optimizer"]),
        ("lr", lambda r: f"{r['learning_rate']:g}"),
        ("final", lambda r: fmt_spread(r["final_loss"], ".5f", False)),
        (
            "steps->tgt",
            lambda r: (
                fmt_spread(r["steps_to_target"], ".0f", False)
                + (
                    f" ({r['reached_target']}/{r['repeats']})"
                    if 0 < r["reached_target"] < r["repeats"]
                    else ""
                )
            ),
        ),
        ("steps x", lambda r: fmt_spread(r["steps_ratio"], ".2f", False)),
        ("step ms", lambda r: _ms(r["median_step_seconds"])),
        ("step-time x", lambda r: fmt_spread(r["step_time_ratio"], ".2f")),
        ("mean x", lambda r: fmt_spread(r["mean_step_time_ratio"], ".2f")),
        ("1st s", lambda r: fmt_spread(r["first_step_seconds"], ".2f", False)),
        ("time->tgt x", lambda r: fmt_spread(r["time_ratio"], ".2f")),
        ("(excl 1st)", lambda r: fmt_spread(r["time_ratio_excl_first"], ".2f")),
    ]
    cells = [[name for name, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = [header]
    for line in cells:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths))
            )
        )
    return "\n".join(lines)


def _ms(s):
    if s is None:
        return "-"
    return f"{s['median'] * 1e3:.2f}"


def versions():
    import heavyball
    import sklearn
    import torch

    try:
        from importlib.metadata import version

        heavyball_version = version("heavyball")
    except Exception:  # noqa: BLE001 - a version string is only informative
        heavyball_version = getattr(heavyball, "__version__", "unknown")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "heavyball": heavyball_version,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import heavyball.utils

    args.heavyball_compile_mode_default = heavyball.utils.compile_mode
    heavyball.utils.compile_mode = COMPILE_MODES[args.compile_mode]
    # Fail on a bad name before any training; spell classes as heavyball does.
    args.optimizers = [
        BASELINE if name.lower() == BASELINE else heavyball_class(name).__name__
        for name in args.optimizers
    ]

    command = (
        shlex.join([sys.executable] + sys.argv) if argv is None else shlex.join(argv)
    )
    info = versions()
    print(f"command: {command}")
    print(
        "versions: "
        + ", ".join(
            f"{k} {info[k]}"
            for k in ("python", "torch", "heavyball", "numpy", "scikit-learn")
        )
    )
    print(
        f"torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
        f"heavyball compile mode {heavyball.utils.compile_mode!r} (--compile-mode "
        f"{args.compile_mode}; heavyball's own: {args.heavyball_compile_mode_default!r}), "
        f"nice {os.nice(0)}, cpus {os.cpu_count()}"
    )
    print(
        f"task digits-ae: steps {args.steps}, eval every {args.eval_every}, "
        f"batch {args.batch_size}, seed {args.seed}, lrs {args.lrs}, "
        f"optimizers {args.optimizers}, repeats {args.repeats}"
    )

    x = load_digits_x()
    batches = batch_indices(len(x), args.batch_size, args.steps, args.seed)
    if args.warmup_steps > 0:
        start = time.perf_counter()
        for name in args.optimizers:
            warm(name, args.lrs[0], x, batches, args)
        print(
            f"warm-up: {args.warmup_steps} untimed steps per optimizer, "
            f"{time.perf_counter() - start:.1f} s"
        )
    runs, repeats = [], []
    wall = time.perf_counter()
    for repeat in range(args.repeats):
        mine = []
        for lr in args.lrs:
            for name in args.optimizers:  # interleaved: adam, shampoo, soap, adam...
                run = train(name, lr, x, batches, args)
                run["repeat"] = repeat
                mine.append(run)
                if not args.quiet:
                    print(
                        f"  repeat {repeat} {name:<14} lr {lr:<7g} final "
                        f"{run['final_loss']:.5f}  median step "
                        f"{run['median_step_seconds'] * 1e3:.2f} ms  first step "
                        f"{run['first_step_seconds']:.2f} s  train "
                        f"{run['train_seconds']:.1f} s",
                        flush=True,
                    )
        target, base_lr = summarize_repeat(mine, args)
        repeats.append({"repeat": repeat, "target": target, "baseline_lr": base_lr})
        runs.extend(mine)
    wall = time.perf_counter() - wall

    rows = aggregate(runs, args)
    targets = sorted({r["target"] for r in repeats})
    source = (
        "given (--target)" if args.target is not None else "best torch-Adam final loss"
    )
    base_lrs = sorted(
        {r["baseline_lr"] for r in repeats if r["baseline_lr"] is not None}
    )
    header = (
        f"target {', '.join(f'{t:.5f}' for t in targets)} ({source}); ratios are "
        f"to torch Adam lr {', '.join(f'{v:g}' for v in base_lrs) or '-'}; "
        f"median [min-max] over {args.repeats} interleaved repeat(s)"
    )
    print()
    print(format_table(rows, header))
    classes = {}
    for r in runs:
        classes.setdefault(
            r["optimizer"], {"class": r["class"], "settings": r["settings"]}
        )
    for name, c in classes.items():
        settings = {k: v for k, v in c["settings"].items() if k != "lr"}
        print(f"{name}: {c['class']} {json.dumps(settings, sort_keys=True)}")
    print(f"wall {wall:.0f} s")

    if args.out:
        result = {
            "tool": "tools/peer_bench.py",
            "task": "digits-ae",
            "command": command,
            "versions": info,
            "settings": {
                "steps": args.steps,
                "eval_every": args.eval_every,
                "batch_size": args.batch_size,
                "lrs": args.lrs,
                "optimizers": args.optimizers,
                "repeats": args.repeats,
                "threads": args.threads,
                "seed": args.seed,
                "warmup_steps": args.warmup_steps,
                "compile_mode": args.compile_mode,
                "heavyball_compile_mode": COMPILE_MODES[args.compile_mode],
                "target_given": args.target,
                "nice": os.nice(0),
            },
            "optimizers": classes,
            "repeats": repeats,
            "summary": rows,
            "runs": runs,
            "wall_seconds": wall,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
