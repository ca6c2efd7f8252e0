"""Time of one root refresh vs the number of replicas.

    python tools/refresh_scaling.py [--replicas 1,2,4] [--task digits-ae]
        [--block-size 1024] [--optimizer shampoo|soap] [--repeats 5]

For each replica count a fresh process splits the CPU into that many logical
devices, builds the optimizer for the task's model under MirroredStrategy,
fills every statistic with a random SPD matrix, and times the refresh
(the in-step refresh, as run at a refresh step) with `distribute_roots` on and off.
Also prints the planned work per replica: the largest share's n³ cost over
the total. On a 2-core machine the logical devices share the cores, so wall
time cannot fall below ~1/2 however the work is split; the work column is
what falls ~1/N on N real devices.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(args):
    import numpy as np
    import tensorflow as tf

    n = args.worker
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * n
    )
    import tf_secondorder as tfso
    from tf_secondorder.bench import tasks
    from tf_secondorder.distribute.sharding import greedy_partition, root_cost

    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")]
    )
    task = tasks.get_task(args.task)
    make = tfso.SOAP if args.optimizer == "soap" else tfso.Shampoo
    rng = np.random.default_rng(0)
    row = {"replicas": n}
    for split in (False, True):
        with strategy.scope():
            model = task.make_model(0)
            opt = make(
                block_size=args.block_size,
                distribute_roots=split,
                root_refresh="in_step",
            )
            opt.build(model.trainable_variables)
        for stat in opt._statistics:
            rows, size = stat.shape[0], stat.shape[1]
            g = rng.normal(size=(rows, size, size + 8)).astype("float32")
            stat.assign(g @ np.swapaxes(g, 1, 2) / size)

        @tf.function
        def refresh(opt=opt):
            with strategy.scope():
                opt._root_refresh._refresh_now(strategy, opt.step_number())

        refresh()  # trace
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            refresh()
            times.append(time.perf_counter() - start)
        row["split" if split else "unsplit"] = float(np.median(times))
    # The work is cut into row ranges of the stacked slots, then assigned.
    pieces = opt._root_refresh.shards(n)
    slots = opt._layout.slots
    costs = [root_cost(slots[s].size) * (e - b) for s, b, e in pieces]
    shares = greedy_partition(costs, n)
    row["factors"] = len(opt._layout.factors)
    row["largest_share"] = max(sum(costs[i] for i in s) for s in shares) / sum(costs)
    row["pieces_per_replica"] = [len(s) for s in shares]
    print("RESULT " + json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--task", default="digits-ae")
    parser.add_argument("--optimizer", choices=["shampoo", "soap"], default="shampoo")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return measure(args)
    rows = []
    for n in (int(v) for v in args.replicas.split(",")):
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(n)]
            + ["--task", args.task, "--optimizer", args.optimizer]
            + ["--block-size", str(args.block_size), "--repeats", str(args.repeats)],
            capture_output=True,
            text=True,
            check=True,
        )
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
        rows.append(json.loads(line[len("RESULT ") :]))
    base = rows[0]["unsplit"]
    print(
        f"{args.optimizer} refresh on {args.task}, block {args.block_size}, "
        f"{rows[0]['factors']} factors"
    )
    print(
        "| replicas | pieces per replica | largest share of the work | "
        "unsplit refresh | split refresh | split vs 1 replica |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['replicas']} | {r['pieces_per_replica']} | "
            f"{r['largest_share']:.2f} | {r['unsplit'] * 1e3:.0f} ms | "
            f"{r['split'] * 1e3:.0f} ms | {r['split'] / base:.2f}× |"
        )


if __name__ == "__main__":
    main()
