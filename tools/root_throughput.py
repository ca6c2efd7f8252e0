"""Batched inverse-root throughput as a fraction of the matmul rate, same run.

    python tools/root_throughput.py [--sizes 128,256,512] [--batch 8]

For coupled Newton the useful flops are counted from the iterations it ran
(4 matmuls per iteration for p=4: two squarings, one product with M, one
update of H; each 2·n³ flops). The matmul rate is a batched float32 matmul of
the same shapes, timed in the same process. eigh is reported as seconds only.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_secondorder.linalg import inverse_pth_root  # noqa: E402
from tf_secondorder.linalg import roots as roots_module  # noqa: E402


def timed(fn, repeats=3):
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def statistics(batch, n, rng):
    g = rng.normal(size=(batch, n, n // 2)).astype("float32")
    return tf.constant(g @ np.transpose(g, (0, 2, 1)) / n)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="128,256,512")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"{'n':>5} {'batch':>5} {'matmul GF/s':>12} {'newton s':>9} {'iters':>6} "
        f"{'newton GF/s':>12} {'fraction':>8} {'eigh f32 s':>10} {'eigh f64 s':>10}"
    )
    for n in (int(s) for s in args.sizes.split(",")):
        print(measure(n, args.batch, rng))


def measure(n, batch, rng):
    a = statistics(batch, n, rng)
    matmul = tf.function(lambda x: tf.matmul(x, x), jit_compile=True)
    rate = batch * 2 * n**3 / timed(lambda: matmul(a).numpy())
    t_newton = timed(lambda: inverse_pth_root(a, 4, 1e-6, "coupled_newton")[0].numpy())
    iters = int(roots_module._coupled_newton_root(a, 4, 1e-6, 100)[3])
    newton_rate = iters * 4 * batch * 2 * n**3 / t_newton
    t_eigh32 = timed(lambda: inverse_pth_root(a, 4, 1e-6, "eigh")[0].numpy())
    t_eigh64 = timed(
        lambda: inverse_pth_root(a, 4, 1e-6, "eigh", compute_dtype="float64")[0].numpy()
    )
    return (
        f"{n:>5} {batch:>5} {rate / 1e9:>12.1f} {t_newton:>9.3f} {iters:>6} "
        f"{newton_rate / 1e9:>12.1f} {newton_rate / rate:>8.2f} {t_eigh32:>10.3f} "
        f"{t_eigh64:>10.3f}"
    )


if __name__ == "__main__":
    main()
