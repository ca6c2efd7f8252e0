"""Run in a fresh process by test_shampoo_saving: load, train N more steps, dump."""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_secondorder as tfso  # noqa: E402,F401  (registers the optimizers)
from tests.helpers import mlp, optimizer_state, regression_data, weights_of  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["keras", "checkpoint"])
    parser.add_argument("path")
    parser.add_argument("out")
    parser.add_argument("--config", default="{}")
    args = parser.parse_args()
    x, y = regression_data()
    if args.mode == "keras":
        model = keras.saving.load_model(args.path)
    else:
        import json

        model = mlp(seed=99)  # different init: everything must come from the checkpoint
        opt = tfso.Shampoo(**json.loads(args.config))
        opt.build(model.trainable_variables)
        tf.train.Checkpoint(model=model, optimizer=opt).read(
            args.path
        ).assert_consumed()
        model.compile(optimizer=opt, loss="mse")
    loaded_state = optimizer_state(model.optimizer)
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    np.savez(
        args.out,
        *weights_of(model),
        iterations=model.optimizer.iterations.numpy(),
        loaded_state_size=len(loaded_state),
        **{f"state{i}": s for i, s in enumerate(loaded_state)},
    )


if __name__ == "__main__":
    main()
