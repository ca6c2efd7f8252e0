"""Shampoo setting variants against Adam on one task, in one process.

Each `--variant` is a comma-separated list of Shampoo arguments (of
`--optimizer`'s, e.g. `--optimizer adam --variant beta_2=0.95`) applied on
top of the library defaults; Adam runs first at `--adam-lr`
and sets the target (its final loss) unless `--target` is given (e.g. the
best Adam of a full `tf-secondorder bench` grid). Prints steps-to-target,
median step time and time-to-target as ratios to that Adam run.

python tools/shampoo_sweep.py --task pydoc-lm --steps 400 --eval-every 25 \\
    --lr 3e-3 --adam-lr 3e-3 --variant "" --variant precondition_frequency=50
"""

import argparse
import json
import os

from tf_secondorder.bench import report, runner, tasks
from tf_secondorder.bench.arguments import parse_options


def parse_variant(text):
    """ "a=1,b=x" -> {"a": 1, "b": "x"} (values parsed as JSON where they can be)."""
    return parse_options(filter(None, (t.strip() for t in text.split(","))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="pydoc-lm")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--optimizer", default="shampoo", help="what the variants are of")
    p.add_argument(
        "--lr", type=float, required=True, help="the variants' learning rate"
    )
    p.add_argument("--adam-lr", type=float, required=True)
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/shampoo_sweep.json")
    args = p.parse_args(argv)

    task = tasks.get_task(args.task, args.steps)
    task.eval_every = args.eval_every
    variants = [parse_variant(v) for v in args.variant or [""]]
    adam = runner.run(task, "adam", args.adam_lr, seed=args.seed, verbose=0)
    target = args.target if args.target is not None else adam["final_loss"]
    base_steps, base_seconds = report.steps_and_seconds_to(adam, target)
    rows = []
    for options in variants:
        r = runner.run(
            task, args.optimizer, args.lr, options, seed=args.seed, verbose=0
        )
        steps, seconds = report.steps_and_seconds_to(r, target)
        r.update(
            variant=options,
            steps_to_target=steps,
            step_time_ratio=r["median_step_seconds"] / adam["median_step_seconds"],
            time_ratio=seconds / base_seconds if seconds and base_seconds else None,
        )
        rows.append(r)
        print(
            f"{json.dumps(options) or '{}':<48} final {r['final_loss']:.4f}  "
            f"steps->tgt {steps}  step-time x {r['step_time_ratio']:.2f}  "
            f"time->tgt x {r['time_ratio'] if r['time_ratio'] else '-'}",
            flush=True,
        )
    print(
        f"adam lr {args.adam_lr:g}: final {adam['final_loss']:.4f}, target "
        f"{target:.4f} reached at step {base_steps}"
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"task": task.name, "target": target, "adam": adam, "runs": rows}, f)


if __name__ == "__main__":
    main()
