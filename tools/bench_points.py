"""Single bench runs on digits-ae at 2 replicas, 2000 steps: final loss and
run bytes of each NAME@LR (names as in `tf-secondorder bench`).

    python tools/bench_points.py compams@1e-3 compams+topk@1e-3
"""

import sys

from tf_secondorder.bench import runner, tasks
from tf_secondorder.bench.arguments import logical_strategy

strategy = logical_strategy(2)
task = tasks.get_task("digits-ae")
for spec in sys.argv[1:]:
    name, lr = spec.split("@")
    r = runner.run(task, name, float(lr), verbose=0, strategy=strategy)
    print(spec, r["final_loss"], r.get("run_bytes_ratio"), flush=True)
