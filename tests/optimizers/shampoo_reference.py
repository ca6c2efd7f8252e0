"""A plain NumPy Shampoo, written from SPEC §3.1 independently of the package.

Loops over explicit index slices and moves axes with np.tensordot instead of
sharing any of the package's partitioning or contraction code.
"""

import itertools

import numpy as np


def reference_merged_shape(shape, limit):
    out = []
    for d in shape:
        if d == 1:
            continue
        if out and out[-1] * d <= limit:
            out[-1] = out[-1] * d
        else:
            out.append(d)
    return out


def reference_block_slices(shape, block_size):
    ranges = [
        [slice(s, min(s + block_size, n)) for s in range(0, n, block_size)]
        for n in shape
    ]
    return list(itertools.product(*ranges))


def reference_root(stat, p, eps):
    lam, q = np.linalg.eigh(stat.astype(np.float64))
    top = lam.max()
    if top <= 0:
        return np.eye(len(stat))
    return (q * (np.maximum(lam, 0.0) + eps * top) ** (-1.0 / p)) @ q.T


class NumpyShampoo:
    def __init__(
        self,
        shapes,
        learning_rate=1e-2,
        beta1=0.9,
        beta2=0.95,
        shampoo_beta=0.95,
        epsilon=1e-4,
        block_size=256,
        precondition_frequency=100,
        start_preconditioning_step=None,
        statistics_frequency=5,
        grafting="adam",
        grafting_epsilon=1e-8,
        nesterov=False,
        exponent_override=2,
        max_preconditioned_dim=None,
        precondition_1d=False,
        packed_statistics=False,  # storage only: the same numbers
        weight_decay=None,
        root_fn=None,
        root_refresh="auto",
        refresh_delay=None,
    ):
        # Pipelined: the roots of step t's statistics are first used at step
        # t + delay (and nothing is preconditioned before start + delay); in
        # the step: at step t.
        self.delay = 0
        if root_refresh != "in_step":
            self.delay = refresh_delay or min(10, precondition_frequency)
        self.pending = None
        # root_fn(param index, (block, axis), statistic, p, epsilon) -> root
        # replaces `reference_root`, e.g. to continue from another run's roots.
        self.root_fn = root_fn or (lambda i, key, s, p, eps: reference_root(s, p, eps))
        self.lr = learning_rate
        self.b1, self.b2, self.eps = beta1, beta2, epsilon
        self.bs = beta2 if shampoo_beta is None else shampoo_beta
        self.freq = precondition_frequency
        self.start = start_preconditioning_step or precondition_frequency
        self.stat_freq = statistics_frequency
        self.grafting, self.geps = grafting, grafting_epsilon
        self.nesterov, self.wd = nesterov, weight_decay
        self.t = 0
        self.params = []
        for shape in shapes:
            merged = reference_merged_shape(shape, block_size)
            is_vector = sum(d > 1 for d in shape) <= 1
            axes = [
                a
                for a, n in enumerate(merged)
                if (max_preconditioned_dim is None or n <= max_preconditioned_dim)
                and (precondition_1d or not is_vector)
            ]
            blocks = reference_block_slices(merged, block_size) if merged else []
            stats, roots = {}, {}
            for b, slices in enumerate(blocks):
                for a in axes:
                    n = slices[a].stop - slices[a].start
                    stats[b, a] = np.zeros((n, n))
                    roots[b, a] = np.eye(n)
            self.params.append(
                dict(
                    shape=tuple(shape),
                    merged=merged,
                    blocks=blocks,
                    # scalable_shampoo's exponent_for_preconditioner: 2 per
                    # preconditioned axis (an axis left out does not count).
                    p=exponent_override or 2 * len(axes),
                    stats=stats,
                    roots=roots,
                    acc=np.zeros(shape),
                    mom=np.zeros(shape),
                )
            )

    def _lr(self):
        # Keras keeps the learning rate in a float32 variable.
        lr = self.lr(self.t - 1) if callable(self.lr) else self.lr
        return float(np.float32(lr))

    def step(self, weights, grads):
        self.t += 1
        t = self.t
        finite = [np.all(np.isfinite(g)) for g in grads]
        for st, g, ok in zip(self.params, grads, finite):
            # Statistics every step up to the first refresh, then every
            # `statistics_frequency` steps.
            if not ok or not st["stats"] or (t > self.start and t % self.stat_freq):
                continue
            gm = g.reshape(st["merged"])
            for (b, a), s in st["stats"].items():
                blk = gm[st["blocks"][b]]
                others = [i for i in range(blk.ndim) if i != a]
                gram = np.tensordot(blk, blk, axes=(others, others))
                st["stats"][b, a] = (
                    s + gram if self.bs == 1 else self.bs * s + (1 - self.bs) * gram
                )
        if self.pending is not None and t == self.pending[0] + self.delay:
            for st, roots in zip(self.params, self.pending[1]):
                st["roots"].update(roots)
            self.pending = None
        if t >= self.start and (t - self.start) % self.freq == 0:
            new = [
                {
                    key: self.root_fn(i, key, s, st["p"], self.eps)
                    for key, s in st["stats"].items()
                }
                for i, st in enumerate(self.params)
            ]
            if self.delay:
                self.pending = (t, new)
            else:
                for st, roots in zip(self.params, new):
                    st["roots"].update(roots)
        out = []
        lr = self._lr()
        for st, w, g, ok in zip(self.params, weights, grads, finite):
            w = w.astype(np.float64)
            if self.wd:
                w = w - lr * self.wd * w
            if not ok:
                out.append(w)
                continue
            u = self._graft(st, g, t)
            if st["stats"] and t >= self.start + self.delay:
                gm, um = g.reshape(st["merged"]), u.reshape(st["merged"])
                d = np.zeros(st["merged"])
                for b, slices in enumerate(st["blocks"]):
                    blk = gm[slices]
                    for a in range(blk.ndim):
                        if (b, a) in st["roots"]:
                            moved = np.tensordot(
                                st["roots"][b, a], blk, axes=([1], [a])
                            )
                            blk = np.moveaxis(moved, 0, a)
                    if self.grafting is not None:
                        blk = (
                            blk
                            * np.linalg.norm(um[slices])
                            / (np.linalg.norm(blk) + 1e-16)
                        )
                    d[slices] = blk
                u = d.reshape(st["shape"])
            if self.b1 > 0:
                st["mom"] = self.b1 * st["mom"] + (1 - self.b1) * u
                m = st["mom"]
                if self.nesterov:
                    m = self.b1 * m + (1 - self.b1) * u
                u = m / (1 - self.b1**t)
            out.append(w - lr * u)
        return out

    def _graft(self, st, g, t):
        kind = self.grafting
        if kind in ("sgd", None):
            return g
        if kind == "adagrad" or self.b2 == 1:
            st["acc"] = st["acc"] + g * g
        else:
            st["acc"] = self.b2 * st["acc"] + (1 - self.b2) * g * g
        v = st["acc"]
        if kind == "adam" and self.b2 < 1:
            v = v / (1 - self.b2**t)
        return g / (np.sqrt(v) + self.geps)
