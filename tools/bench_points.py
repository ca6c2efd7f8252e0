"""Single bench runs on digits-ae at 2 replicas, 2000 steps: final loss and
run bytes of each NAME@LR[:OPTION=VALUE,...] (names as in
`tf-secondorder bench`; options are the optimizer's keyword arguments, each
value JSON, e.g. `3`, `0.99`, `true`, `null`, or else a string).

    python tools/bench_points.py compams@1e-3 compams+topk@1e-3
    python tools/bench_points.py adam@3e-3:amsgrad=true \
        compams@3e-3:compression_warmup_steps=0
"""

import sys

from tf_secondorder.bench import runner, tasks
from tf_secondorder.bench.arguments import logical_strategy, parse_value


def parse(spec):
    """ "compams@3e-3:beta2=0.99" -> ("compams", 0.003, {"beta2": 0.99})."""
    head, _, options = spec.partition(":")
    name, lr = head.split("@")
    parsed = {}
    for pair in filter(None, options.split(",")):
        key, value = pair.split("=")
        parsed[key] = parse_value(value)
    return name, float(lr), parsed


strategy = logical_strategy(2)
task = tasks.get_task("digits-ae")
for spec in sys.argv[1:]:
    name, lr, options = parse(spec)
    r = runner.run(task, name, lr, options=options, verbose=0, strategy=strategy)
    print(spec, r["final_loss"], r.get("run_bytes_ratio"), flush=True)
