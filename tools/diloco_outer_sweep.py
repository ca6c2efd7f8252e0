"""DiLoCo outer-optimizer settings at H = 32 on digits-ae, 2 replicas, 2000
steps, AdamW lr 3e-3 inside (final task loss of each).

    python tools/diloco_outer_sweep.py [CONFIG ...]
"""

import json
import sys

import keras

import tf_secondorder as tfso
from tf_secondorder.bench import runner, tasks
from tf_secondorder.bench.arguments import logical_strategy

strategy = logical_strategy(2)
CONFIGS = {
    "sgd1.0_m0.5n": dict(lr=1.0, momentum=0.5),
    "sgd0.8_m0.3n": dict(lr=0.8, momentum=0.3),
    "sgd1.0_m0.3n": dict(lr=1.0, momentum=0.3),
}
which = sys.argv[1:] or list(CONFIGS)
task = tasks.get_task("digits-ae")
out = {}
for name in which:
    c = CONFIGS[name]

    def make(lr, compression=None, c=c, **o):
        return tfso.distributed(
            keras.optimizers.AdamW(lr, **o),
            average_every=32,
            outer_optimizer=keras.optimizers.SGD(
                c["lr"], momentum=c["momentum"], nesterov=True
            ),
            average_compression=compression,
        )

    runner.TFSO_OPTIMIZERS["x_" + name] = make
    r = runner.run(task, "x_" + name, 3e-3, verbose=0, strategy=strategy)
    out[name] = r["final_loss"]
    print(name, r["final_loss"], flush=True)
print(json.dumps(out))
