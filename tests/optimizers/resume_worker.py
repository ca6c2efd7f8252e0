"""Run in a fresh process by test_shampoo_saving: load, train one more epoch, dump.

    python -m tests.optimizers.resume_worker --config JSON MODE PATH OUT [MODE PATH OUT ...]

For each (MODE, PATH, OUT): MODE "keras" loads the `.keras` file PATH,
"checkpoint" restores the tf.train.Checkpoint PATH into a fresh model and
Shampoo(**config); then one epoch of `regression_data` is trained and OUT
gets the weights, the iteration count and the optimizer state as loaded.
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_secondorder as tfso  # noqa: E402  (registers the optimizers)
from tests.helpers import (  # noqa: E402
    apply_test_thread_setting,
    mlp,
    optimizer_state,
    regression_data,
    weights_of,
)


def resume(mode, path, out, config):
    x, y = regression_data()
    if mode == "keras":
        model = keras.saving.load_model(path)
    else:
        model = mlp(seed=99)  # different init: everything must come from the checkpoint
        opt = tfso.Shampoo(**config)
        opt.build(model.trainable_variables)
        tf.train.Checkpoint(model=model, optimizer=opt).read(path).assert_consumed()
        model.compile(optimizer=opt, loss="mse")
    loaded_state = optimizer_state(model.optimizer)
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    np.savez(
        out,
        *weights_of(model),
        iterations=model.optimizer.iterations.numpy(),
        loaded_state_size=len(loaded_state),
        **{f"state{i}": s for i, s in enumerate(loaded_state)},
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="{}")
    parser.add_argument("runs", nargs="+", help="MODE PATH OUT, repeated")
    args = parser.parse_args()
    assert len(args.runs) % 3 == 0, args.runs
    apply_test_thread_setting()
    config = json.loads(args.config)
    for i in range(0, len(args.runs), 3):
        mode, path, out = args.runs[i : i + 3]
        assert mode in ("keras", "checkpoint"), mode
        resume(mode, path, out, config)


if __name__ == "__main__":
    main()
