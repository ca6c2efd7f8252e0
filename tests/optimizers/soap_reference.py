"""A plain NumPy SOAP, written from Vyas et al. (2024) and their code.

Loops over explicit block slices and axes with np.tensordot/np.moveaxis and
uses NumPy's eigh/QR, sharing no code with the package.
"""

import numpy as np

from tests.optimizers.shampoo_reference import (
    reference_block_slices,
    reference_merged_shape,
)


def _mode_product(block, matrix, axis):
    """Contracts `axis` of block with the matrix's second index."""
    return np.moveaxis(np.tensordot(matrix, block, axes=([1], [axis])), 0, axis)


class NumpySOAP:
    def __init__(
        self,
        shapes,
        learning_rate=3e-3,
        beta1=0.95,
        beta2=0.95,
        shampoo_beta=None,
        epsilon=1e-8,
        block_size=1024,
        precondition_frequency=10,
        start_preconditioning_step=1,
        max_preconditioned_dim=None,
        weight_decay=None,
        precondition_1d=False,
        packed_statistics=False,  # storage only: the same numbers
        root_refresh="auto",
        refresh_delay=None,
        grafting="adam",
    ):
        # The bases of step t's statistics are first used at step t + delay:
        # pipelined, after the host computed them; in the step, at t + 1
        # (they are computed after step t's update, as in the authors' code,
        # which never applies a basis to the gradient it came from).
        self.delay = 1
        if root_refresh != "in_step":
            self.delay = refresh_delay or min(10, precondition_frequency)
        self.pending = None
        self.grafting = grafting
        self.lr, self.b1, self.b2, self.eps = learning_rate, beta1, beta2, epsilon
        self.bs = beta2 if shampoo_beta is None else shampoo_beta
        self.freq, self.start, self.wd = (
            precondition_frequency,
            start_preconditioning_step,
            weight_decay,
        )
        self.t = 0
        self.params = []
        for shape in shapes:
            merged = reference_merged_shape(shape, block_size)
            blocks = reference_block_slices(merged, block_size) if merged else []
            is_vector = sum(d > 1 for d in shape) <= 1
            axes = [
                a
                for a, n in enumerate(merged)
                if (max_preconditioned_dim is None or n <= max_preconditioned_dim)
                and (precondition_1d or not is_vector)
            ]
            stats, bases = {}, {}
            for b, slices in enumerate(blocks):
                for a in axes:
                    n = slices[a].stop - slices[a].start
                    stats[b, a] = np.zeros((n, n))
                    bases[b, a] = np.eye(n)
            self.params.append(
                dict(
                    shape=tuple(shape),
                    merged=merged,
                    blocks=blocks,
                    stats=stats,
                    bases=bases,
                    m=np.zeros(shape),
                    v=np.zeros(merged or shape),
                    # Adam's second moment in the parameter's coordinates.
                    v_graft=np.zeros(merged or shape),
                )
            )

    def _rotate(self, st, tensor, back):
        """Each block's axis a multiplied by Q_aᵀ (into the basis) or Q_a."""
        out = np.array(tensor, dtype=np.float64).reshape(st["merged"])
        for b, slices in enumerate(st["blocks"]):
            blk = out[slices]
            for a in range(blk.ndim):
                if (b, a) in st["bases"]:
                    q = st["bases"][b, a]
                    blk = _mode_product(blk, q if back else q.T, a)
            out[slices] = blk
        return out

    def _new_bases(self, st, first):
        """{(block, axis): (basis, column order)} from the statistics now."""
        out = {}
        for (b, a), s in st["stats"].items():
            if first:
                lam, q = np.linalg.eigh(s)
                out[b, a] = (q[:, np.argsort(-lam, kind="stable")], None)
                continue
            q = st["bases"][b, a]
            estimates = np.diag(q.T @ s @ q)
            order = np.argsort(-estimates, kind="stable")
            out[b, a] = (np.linalg.qr(s @ q[:, order])[0], order)
        return out

    def _install(self, st, new, first):
        if first and st["stats"]:
            # The authors' code starts both moments (and the step count of
            # their bias corrections) with the first eigenbasis.
            st["v"] = np.zeros_like(st["v"])
            st["m"] = np.zeros_like(st["m"])
            st["v_graft"] = np.zeros_like(st["v_graft"])
        for (b, a), (q, order) in new.items():
            st["bases"][b, a] = q
            if order is not None:
                # The second moments follow their basis vectors.
                slices = st["blocks"][b]
                st["v"][slices] = np.take(st["v"][slices], order, axis=a)

    def step(self, weights, grads):
        self.t += 1
        t = self.t
        for st, g in zip(self.params, grads):
            gm = np.asarray(g, np.float64).reshape(st["merged"])
            for (b, a), s in st["stats"].items():
                blk = gm[st["blocks"][b]]
                others = [i for i in range(blk.ndim) if i != a]
                gram = np.tensordot(blk, blk, axes=(others, others))
                st["stats"][b, a] = self.bs * s + (1 - self.bs) * gram
        if self.pending is not None and t == self.pending[0] + self.delay:
            taken, bases = self.pending
            for st, new in zip(self.params, bases):
                self._install(st, new, first=taken == self.start)
            self.pending = None
        if t >= self.start and (t - self.start) % self.freq == 0:
            bases = [self._new_bases(st, t == self.start) for st in self.params]
            if self.delay:
                self.pending = (t, bases)
            else:
                for st, new in zip(self.params, bases):
                    self._install(st, new, first=t == self.start)
        lr = float(np.float32(self.lr))
        out = []
        for st, w, g in zip(self.params, weights, grads):
            w = np.asarray(w, np.float64)
            if self.wd:
                w = w - lr * self.wd * w
            st["m"] = self.b1 * st["m"] + (1 - self.b1) * g
            rotated = self._rotate(st, g, back=False)
            st["v"] = self.b2 * st["v"] + (1 - self.b2) * rotated**2
            normalized = self._rotate(st, st["m"], back=False) / (
                np.sqrt(st["v"]) + self.eps
            )
            direction = self._rotate(st, normalized, back=True)
            if self.grafting == "adam" and st["stats"]:
                # Each block of the direction gets the length of Adam's.
                gm = np.asarray(g, np.float64).reshape(st["merged"])
                st["v_graft"] = self.b2 * st["v_graft"] + (1 - self.b2) * gm**2
                adam = st["m"].reshape(st["merged"]) / (
                    np.sqrt(st["v_graft"]) + self.eps
                )
                for slices in st["blocks"]:
                    length = np.linalg.norm(adam[slices])
                    direction[slices] *= length / (
                        np.linalg.norm(direction[slices]) + 1e-16
                    )
            direction = direction.reshape(st["shape"])
            first_use = self.start + self.delay
            t_own = t - first_use + 1 if st["stats"] and t >= first_use else t
            step = lr * np.sqrt(1 - self.b2**t_own) / (1 - self.b1**t_own)
            out.append(w - step * direction)
        return out
