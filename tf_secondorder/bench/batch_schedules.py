"""`tf-secondorder bench --batch-schedule`: fixed against growing batches at
equal samples.

Each schedule trains on the same sample budget; a fixed batch B takes
budget / B steps, a growing one (CR-PSGD, `tfso.data.GrowingBatchSchedule`)
far fewer. Every step is one round of communication, so the comparison is
the task loss against samples (the work) and against rounds (the
messages). Schedules are written `B` (fixed), `growing:B1:RHO[:CAP]` or
`catalyst:B1:RHO:THETA[:CAP]` (CR-PSGD-Catalyst: the paper's ⌊√(N·T)⌋
stages of growing batches, each minimising f + θ/2‖x − y_k‖² around the
weights y_k at its start).
"""

import contextlib
import dataclasses
import math
import time

import keras
import numpy as np

from tf_secondorder.bench.usage import usage_error
from tf_secondorder.data.growing import GrowingBatchSchedule, growing_batches
from tf_secondorder.data.train_step import train_in_micro_batches

EVALUATIONS = 20  # points on each curve, evenly spaced in samples


@dataclasses.dataclass(frozen=True)
class BatchSchedule:
    batch_size: int  # fixed batch, or B₁ when growing
    growth: float = 1.0  # ρ; 1: fixed
    cap: int = None
    theta: float = 0.0  # Catalyst's proximal weight; 0: plain CR-PSGD

    @property
    def label(self):
        if self.growth == 1.0:
            return f"fixed {self.batch_size}"
        cap = f", cap {self.cap}" if self.cap else ""
        if self.theta:
            return (
                f"catalyst {self.batch_size}x{self.growth:g}^t{cap}, θ {self.theta:g}"
            )
        return f"growing {self.batch_size}x{self.growth:g}^t{cap}"

    def growing_schedule(self, budget, replicas):
        """The `tfso.data.GrowingBatchSchedule` of a growing schedule."""
        if self.theta:
            return GrowingBatchSchedule.catalyst(
                self.batch_size, self.growth, budget, replicas, self.cap
            )
        return GrowingBatchSchedule(
            self.batch_size,
            self.growth,
            budget,
            max_batch_size=self.cap,
            multiple_of=replicas,
        )

    def sizes(self, budget, replicas):
        """Batch sizes (global) spending `budget` examples, each a multiple
        of `replicas` so that every replica gets an equal share."""
        if self.growth == 1.0:
            return [self.batch_size] * (budget // self.batch_size)
        sizes = self.growing_schedule(budget, replicas).batch_sizes()
        # The last batch holds the remainder: drop it if not a multiple.
        if sizes[-1] % replicas:
            sizes = sizes[:-1]
        return sizes


def parse(text, replicas):
    """`--batch-schedule` text -> [BatchSchedule]; raises UsageError."""
    expected = (
        "comma-separated schedules, each B (a fixed batch) or "
        "growing:B1:RHO[:CAP] or catalyst:B1:RHO:THETA[:CAP] with integers "
        "B, B1, CAP >= 1 (multiples of --replicas), RHO > 1 and THETA > 0, "
        "e.g. 32,128,growing:8:1.05:4096"
    )
    schedules = []
    for entry in text.split(","):
        parts = entry.strip().split(":")
        try:
            if len(parts) == 1:
                schedule = BatchSchedule(int(parts[0]))
            elif parts[0] == "growing" and len(parts) in (3, 4):
                cap = int(parts[3]) if len(parts) == 4 else None
                schedule = BatchSchedule(int(parts[1]), float(parts[2]), cap)
            elif parts[0] == "catalyst" and len(parts) in (4, 5):
                cap = int(parts[4]) if len(parts) == 5 else None
                theta = float(parts[3])
                if not (theta > 0 and math.isfinite(theta)):
                    raise ValueError
                schedule = BatchSchedule(int(parts[1]), float(parts[2]), cap, theta)
            else:
                raise ValueError
        except ValueError:
            raise usage_error("batch_schedule", expected, repr(text)) from None
        growing = len(parts) > 1
        if (
            schedule.batch_size < 1
            or schedule.batch_size % replicas
            or (
                growing and not (schedule.growth > 1 and math.isfinite(schedule.growth))
            )
            or (schedule.cap is not None and schedule.cap < schedule.batch_size)
        ):
            raise usage_error(
                "batch_schedule", expected, f"{text!r} (entry {entry.strip()!r})"
            )
        schedules.append(schedule)
    return schedules


class _SampleRecorder(keras.callbacks.Callback):
    """The task loss at evenly spaced sample counts, with the rounds so far."""

    def __init__(self, task, sizes):
        super().__init__()
        self.task, self.ends = task, np.cumsum(sizes)
        budget = int(self.ends[-1])
        marks = [budget * (k + 1) // EVALUATIONS for k in range(EVALUATIONS)]
        # The first step at or past each mark.
        self.at = sorted({int(np.searchsorted(self.ends, m)) for m in marks})
        self.curve = []  # [rounds, samples, loss]

    def on_train_batch_end(self, batch, logs=None):
        if batch in self.at:
            loss = self.task.evaluate(self.model)
            self.curve.append([batch + 1, int(self.ends[batch]), loss])


def run(task, optimizer_name, learning_rate, schedule, budget, seed, strategy):
    """Trains on `budget` examples batched by `schedule`; returns the record."""
    from tf_secondorder.bench import optimizers

    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    sizes = schedule.sizes(budget, replicas)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = task.make_model(seed)
        optimizer = optimizers.make_optimizer(optimizer_name, learning_rate)
        optimizer.build(model.trainable_variables)
        model.compile(optimizer=optimizer, loss=task.loss)
    examples = task.make_examples(seed)
    if schedule.growth == 1.0:
        data = examples.repeat().batch(schedule.batch_size, drop_remainder=True)
        data = data.take(len(sizes))
    else:
        growing = schedule.growing_schedule(budget, replicas)
        data = growing_batches(examples, growing).take(len(sizes))
        if schedule.theta:
            train_in_micro_batches(
                model, catalyst_theta=schedule.theta, schedule=growing
            )
    recorder = _SampleRecorder(task, sizes)
    start = time.perf_counter()
    model.fit(data, epochs=1, callbacks=[recorder], verbose=0, shuffle=False)
    return {
        "optimizer": optimizer_name,
        "learning_rate": learning_rate,
        "schedule": schedule.label,
        "seed": seed,
        "replicas": replicas,
        "rounds": len(sizes),
        "samples": int(sum(sizes)),
        "largest_batch": int(max(sizes)),
        "final_loss": recorder.curve[-1][2],
        "curve": recorder.curve,
        "seconds": time.perf_counter() - start,
    }


def best_runs(results):
    """{(optimizer, schedule, seed): the run with the lowest final loss}."""
    best = {}
    for r in results:
        key = (r["optimizer"], r["schedule"], r["seed"])
        if key not in best or r["final_loss"] < best[key]["final_loss"]:
            best[key] = r
    return best


def format_table(task, results):
    """One line per optimizer and schedule at its best learning rate; the
    ratios compare with the best fixed batch of the same optimizer and seed
    (the lowest final loss among fixed schedules)."""
    best = best_runs(results)
    lines = [
        f"task {task.name}: {task.info.get('metric', 'loss')}, "
        f"{results[0]['samples'] if results else 0} samples per run",
        f"{'optimizer':<10}{'schedule':<32}{'lr':>7}{'seed':>6}{'rounds':>8}"
        f"{'final':>12}{'x best fixed':>14}{'rounds x':>10}",
    ]
    for (name, label, seed), r in sorted(best.items()):
        fixed = [
            b
            for (n, lab, s), b in best.items()
            if n == name and s == seed and lab.startswith("fixed")
        ]
        ratio = rounds = "-"
        if fixed:
            reference = min(fixed, key=lambda b: b["final_loss"])
            ratio = f"{r['final_loss'] / reference['final_loss']:.2f}"
            rounds = f"{r['rounds'] / reference['rounds']:.3f}"
        lines.append(
            f"{name:<10}{label:<32}{r['learning_rate']:>7g}{seed:>6}"
            f"{r['rounds']:>8}{r['final_loss']:>12.3e}{ratio:>14}{rounds:>10}"
        )
    return "\n".join(lines)


def plot(task, results, out_dir):
    """Loss against samples and against rounds (log scales), each optimizer
    and schedule at its best learning rate (first seed)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_runs(results)
    seed = min(s for _, _, s in best)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, label, s), r in sorted(best.items()):
        if s != seed:
            continue
        curve = np.array(r["curve"], dtype=float)
        for axis, column in zip(axes, (1, 0)):
            axis.loglog(
                curve[:, column], curve[:, 2], marker=".", label=f"{name}, {label}"
            )
    for axis, xlabel in zip(axes, ("samples", "rounds (optimizer steps)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(task.info.get("metric", "loss"))
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"{task.name}: best learning rate per schedule, seed {seed}")
    figure.tight_layout()
    path = os.path.join(out_dir, "loss_vs_samples_and_rounds.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]


def bench(args, task, names, lrs, strategy, budget):
    """The `--batch-schedule` grid: every optimizer, schedule and learning
    rate, seeds interleaved; prints the table, writes results.json and the
    plot to `args.out`; returns the results."""
    import json
    import os

    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    schedules = parse(args.batch_schedule, replicas)
    results = []
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        for name in names:
            for schedule in schedules:
                for lr in lrs:
                    print(
                        f"== {task.name}: {name} lr={lr:g} {schedule.label} "
                        f"seed {seed}",
                        flush=True,
                    )
                    results.append(
                        run(task, name, lr, schedule, budget, seed, strategy)
                    )
    print(format_table(task, results))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(
            {
                "task": task.name,
                "task_info": task.info,
                "replicas": replicas,
                "samples": budget,
                "runs": results,
            },
            f,
            indent=1,
        )
    plots = plot(task, results, args.out)
    print(f"wrote {path}, " + ", ".join(plots))
    return results
