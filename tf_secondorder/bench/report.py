"""Compares the runs of one benchmark: each against the best baseline run of
its repeat, medians and spread over repeats, the results table and the loss
plots."""


def steps_and_seconds_to(result, target):
    """First evaluated step (and training seconds) at which loss <= target."""
    for (step, loss), seconds in zip(
        result["curve"], result["curve_seconds"], strict=True
    ):
        if loss <= target:
            return step, seconds
    return None, None


def summarize(task, results, baseline="adam"):
    """Adds target, steps/time-to-target and ratios to the baseline in place.

    `results` are the runs of one repeat: the target is the final loss of the
    best `baseline` run among them, and every ratio compares with that run.
    """
    base_runs = [r for r in results if r["optimizer"] == baseline]
    pool = base_runs or results
    best_base = min(pool, key=lambda r: r["final_loss"])
    target = best_base["final_loss"]
    base_steps, base_seconds = steps_and_seconds_to(best_base, target)
    for r in results:
        steps, seconds = steps_and_seconds_to(r, target)
        r["steps_to_target"] = steps
        r["seconds_to_target"] = seconds
        r["step_time_ratio"] = (
            r["median_step_seconds"] / best_base["median_step_seconds"]
        )
        r["amortized_step_time_ratio"] = (
            r["mean_step_seconds"] / best_base["mean_step_seconds"]
        )
        r["first_step_ratio"] = (
            r["first_step_seconds"] / best_base["first_step_seconds"]
        )
        r["steps_ratio"] = steps / base_steps if steps else None
        r["time_ratio"] = seconds / base_seconds if seconds else None
        if "refresh_step_seconds" in r:
            ordinary = r.get("refresh_baseline_seconds", r["median_step_seconds"])
            r["refresh_cost"] = r["refresh_step_seconds"] / ordinary
    return {
        "task": task.name,
        "target": target,
        "baseline": baseline,
        "baseline_lr": best_base["learning_rate"],
    }


# Per-run numbers that `aggregate` reports as median and spread over repeats.
# A run that never reaches the target counts as infinitely slow there.
AGGREGATED = (
    "final_loss",
    "averaged_final_loss",
    "steps_to_target",
    "steps_ratio",
    "step_time_ratio",
    "amortized_step_time_ratio",
    "time_ratio",
    "first_step_ratio",
    "refresh_cost",
    "state_memory_ratio",
    "bytes_per_step",
    "run_bytes_ratio",
)
_NEVER = ("steps_to_target", "steps_ratio", "time_ratio")


def spread(values, missing_is_infinite=False):
    """{"median", "min", "max", "values"} of `values`.

    None entries are runs that never reached the target: with
    `missing_is_infinite` they count as +infinity (and a statistic that lands
    on one is None), otherwise they are left out.
    """
    numbers = [
        float("inf") if v is None else float(v)
        for v in values
        if v is not None or missing_is_infinite
    ]
    if not numbers:
        return {"median": None, "min": None, "max": None, "values": list(values)}

    def finite(x):
        return None if x == float("inf") else float(x)

    ordered = sorted(numbers)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        median = ordered[middle]
    else:
        median = (ordered[middle - 1] + ordered[middle]) / 2
    return {
        "median": finite(median),
        "min": finite(ordered[0]),
        "max": finite(ordered[-1]),
        "values": list(values),
    }


def aggregate(results):
    """One entry per (optimizer, learning rate): median and spread over repeats.

    Each entry has "optimizer", "learning_rate", "repeats" (the number of
    runs) and, for each name in `AGGREGATED` that its runs report,
    {"median", "min", "max", "values"} (see `spread`).
    """
    groups = {}
    for r in results:
        groups.setdefault((r["optimizer"], r["learning_rate"]), []).append(r)
    entries = []
    for (name, lr), runs in groups.items():
        entry = {"optimizer": name, "learning_rate": lr, "repeats": len(runs)}
        for key in AGGREGATED:
            if any(key in r for r in runs):
                entry[key] = spread(
                    [r.get(key) for r in runs], missing_is_infinite=key in _NEVER
                )
        entries.append(entry)
    return entries


def _fmt(value, spec):
    return format(value, spec) if value is not None else "-"


def format_table(summary, results, configurations=None):
    """The results table: one row per run, or with `configurations` (from
    `aggregate`, more than one repeat) one row per optimizer and learning
    rate with each number's median and [min-max] over the repeats."""
    repeats = max((c["repeats"] for c in configurations or []), default=1)
    head = (
        f"task {summary['task']}: target {summary['target']:.5f} "
        f"(best {summary['baseline']}, lr {summary['baseline_lr']:g})"
    )
    if repeats > 1:
        return _format_repeats(summary, configurations, repeats)
    width = max([11] + [len(r["optimizer"]) for r in results])
    with_bytes = any("bytes_per_step" in r for r in results)
    with_average = any("averaged_final_loss" in r for r in results)
    lines = [
        head,
        f"{'optimizer':<{width}} lr       final     steps->tgt  steps x  step-time x  "
        "(amortised)  time->tgt x  refresh x  first-step x  state/weights"
        + ("  bytes/step  run bytes x" if with_bytes else "")
        + ("  averaged" if with_average else ""),
    ]
    for r in results:
        lines.append(
            f"{r['optimizer']:<{width}} {r['learning_rate']:<8g} {r['final_loss']:<9.5f} "
            f"{_fmt(r['steps_to_target'], 'd'):>10}  {_fmt(r['steps_ratio'], '.2f'):>7}  "
            f"{r['step_time_ratio']:>11.2f}  {r['amortized_step_time_ratio']:>11.2f}  "
            f"{_fmt(r['time_ratio'], '.2f'):>11}  "
            f"{_fmt(r.get('refresh_cost'), '.1f'):>9}  "
            f"{_fmt(r.get('first_step_ratio'), '.2f'):>12}  "
            f"{_fmt(r.get('state_memory_ratio'), '.2f'):>13}"
            + (
                f"  {_fmt(r.get('bytes_per_step'), 'd'):>10}"
                f"  {_fmt(r.get('run_bytes_ratio'), '.4f'):>11}"
                if with_bytes
                else ""
            )
            + (
                f"  {_fmt(r.get('averaged_final_loss'), '.5f'):>8}"
                if with_average
                else ""
            )
        )
    return "\n".join(lines)


def _format_repeats(summary, configurations, repeats):
    columns = [
        ("final", "final_loss", ".5f"),
        ("steps->tgt", "steps_to_target", ".0f"),
        ("steps x", "steps_ratio", ".2f"),
        ("step-time x", "step_time_ratio", ".2f"),
        ("(amortised)", "amortized_step_time_ratio", ".2f"),
        ("time->tgt x", "time_ratio", ".2f"),
        ("refresh x", "refresh_cost", ".1f"),
        ("first-step x", "first_step_ratio", ".2f"),
        ("state/weights", "state_memory_ratio", ".2f"),
    ]
    if any("bytes_per_step" in c for c in configurations):
        columns.append(("bytes/step", "bytes_per_step", ".0f"))
        columns.append(("run bytes x", "run_bytes_ratio", ".4f"))
    if any("averaged_final_loss" in c for c in configurations):
        columns.append(("averaged", "averaged_final_loss", ".5f"))

    def cell(stats, spec):
        if stats is None:
            return "-"
        if stats["min"] is None and stats["median"] is None:
            return "-"
        low = _fmt(stats["min"], spec)
        high = _fmt(stats["max"], spec) if stats["max"] is not None else "never"
        middle = _fmt(stats["median"], spec) if stats["median"] is not None else "-"
        return middle if low == high else f"{middle} [{low}-{high}]"

    rows = [
        [c["optimizer"], f"{c['learning_rate']:g}"]
        + [cell(c.get(key), spec) for _, key, spec in columns]
        for c in configurations
    ]
    header = ["optimizer", "lr"] + [title for title, _, _ in columns]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]

    def line(row):
        left = [f"{row[0]:<{widths[0]}}", f"{row[1]:<{widths[1]}}"]
        right = [f"{v:>{w}}" for v, w in zip(row[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    head = (
        f"task {summary['task']}: median [min-max] over {repeats} repeats "
        f"(seeds {', '.join(str(s) for s in summary.get('seeds', []))}); "
        "each repeat's target is its best "
        f"{summary['baseline']}'s final loss (first repeat: {summary['target']:.5f}, "
        f"lr {summary['baseline_lr']:g})"
    )
    return "\n".join([head, line(header)] + [line(row) for row in rows])


def plot(summary, results, out_dir):
    """loss_vs_steps.png and loss_vs_time.png in `out_dir`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per optimizer, one line style per learning rate.
    names = list(dict.fromkeys(r["optimizer"] for r in results))
    rates = sorted({r["learning_rate"] for r in results})
    styles = ["-", "--", ":", "-."]
    colours = plt.get_cmap("tab10")
    paths = []
    for name, axis, label in (
        ("loss_vs_steps.png", "steps", "step"),
        ("loss_vs_time.png", "seconds", "training seconds"),
    ):
        figure, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for r in results:
            losses = [loss for _, loss in r["curve"]]
            xs = [s for s, _ in r["curve"]] if axis == "steps" else r["curve_seconds"]
            ax.plot(
                xs,
                losses,
                color=colours(names.index(r["optimizer"]) % 10),
                linestyle=styles[rates.index(r["learning_rate"]) % len(styles)],
                # Later repeats: same colour and style, fainter, one legend entry.
                alpha=1.0 if r.get("repeat", 0) == 0 else 0.4,
                label=(
                    f"{r['optimizer']} lr={r['learning_rate']:g}"
                    if r.get("repeat", 0) == 0
                    else None
                ),
            )
        ax.axhline(summary["target"], color="black", linewidth=0.8, label="target")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(summary.get("metric", "loss"))
        ax.set_title(f"{summary['task']}")
        ax.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        path = f"{out_dir}/{name}"
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)
    return paths
