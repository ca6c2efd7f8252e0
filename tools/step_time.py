"""Per-step time of Shampoo vs Adam, interleaved so machine drift cancels.

    python tools/step_time.py --task pydoc-lm --rounds 6 --steps 50 \
        [--shampoo-option statistics_frequency=5 ...]

Both models are built and traced first; then each round runs `--steps`
train steps of Adam and then of Shampoo through `model.train_on_batch` on the
task's batches. Rounds of Shampoo cover its refresh and statistics steps in
proportion (use `--steps` a multiple of `precondition_frequency` /
`statistics_frequency` for an exact amortisation). Prints the ratio of means
per round and their median.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tf_secondorder.bench import runner, tasks  # noqa: E402
from tf_secondorder.bench.arguments import parse_options  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="pydoc-lm")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--shampoo-option", action="append", metavar="KEY=VALUE")
    args = parser.parse_args()
    task = tasks.get_task(args.task)
    batches = iter(task.make_dataset(0))
    pool = [next(batches) for _ in range(args.steps)]
    options = parse_options(args.shampoo_option)
    runs = {}
    for name in ("adam", "shampoo"):
        model = task.make_model(0)
        optimizer = runner.make_optimizer(
            name, args.lr, options if name == "shampoo" else None
        )
        optimizer.build(model.trainable_variables)
        model.compile(optimizer=optimizer, loss=task.loss)
        model.train_on_batch(*pool[0])  # trace
        runs[name] = model
    shampoo = runs["shampoo"].optimizer
    print(
        f"task {task.name}; shampoo: precondition_frequency="
        f"{shampoo.precondition_frequency} statistics_frequency="
        f"{shampoo.statistics_frequency} block_size={shampoo.block_size}"
    )
    ratios = []
    for r in range(args.rounds):
        means = {}
        for name, model in runs.items():
            start = time.perf_counter()
            for x, y in pool:
                model.train_on_batch(x, y)
            means[name] = (time.perf_counter() - start) / len(pool)
        ratios.append(means["shampoo"] / means["adam"])
        print(
            f"round {r}: adam {means['adam'] * 1e3:.1f} ms/step, shampoo "
            f"{means['shampoo'] * 1e3:.1f} ms/step, ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(
        f"median ratio over rounds: {np.median(ratios):.3f} "
        f"(root failures: {int(shampoo.root_failures.numpy())})"
    )


if __name__ == "__main__":
    main()
