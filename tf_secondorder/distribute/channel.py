"""The collectives of one step on one replica: batched, counted, and carrying
whether every replica's gradients were finite.

Every wire tensor handed to one kind of collective in one call is flattened
into one buffer per dtype, so a step costs one collective per dtype per
round instead of one per variable; gathers move bits, not numbers, so their
payloads all travel as int32 words in a single buffer. `bytes` and `rounds`
count what this replica hands to the collectives while the step is traced
(static for a given model, so exact); `received` counts what they deliver
to it (an all_reduce its buffer, an all_gather N buffers, an all_to_all one).
Both count a replica's own share too: an all_to_all's row for itself is in
`bytes` and in `received`, an all_gather's own buffer in `received`. What
crosses links is smaller by that share; an all_gather's ring also forwards
N−1 buffers per replica that `bytes` (what was handed over) leaves out.

**The finite flag.** A step with a non-finite gradient on any replica is
skipped whole, including every replica's error-feedback memory, which lives
in replica context where a replica sees only its own gradient. So the first
buffer of the step carries one more element, this replica's "not finite"
flag: summed by an all_reduce, gathered by the others. `all_finite` is then
the same on every replica, and `commit` assigns state only when it is true.
"""

import numpy as np
import tensorflow as tf

from tf_secondorder.compat import collectives
from tf_secondorder.compression import packing


class Channel:
    """Collectives of one replica in one step (replica context).

    Args:
        replica_context: the step's `tf.distribute.ReplicaContext`.
        local_finite: scalar bool, whether this replica's gradients are finite.
        active: scalar bool, whether the exchange's result is used this step
            (state is committed only then); None: always.
    """

    def __init__(self, replica_context, local_finite, active=None):
        self.context = replica_context
        self.num_replicas = replica_context.num_replicas_in_sync
        self.bytes = 0
        self.received = 0
        self.rounds = 0
        self.local_finite = local_finite
        # Set by the step's first collective; until then only this replica's.
        self.all_finite = None
        self.active = active
        self.updates = []

    def commit(self, variable, value):
        """Assigns `value` to the state `variable` only if every replica's
        gradients were finite (after the first collective) and the exchange
        is in use."""
        keep = self.all_finite if self.all_finite is not None else self.local_finite
        if self.active is not None:
            keep = tf.logical_and(keep, self.active)
        self.updates.append(variable.assign(tf.where(keep, value, variable)))

    def all_reduce(self, wires):
        """Sums a list of wire lists over replicas; same structure back."""
        return self._batched(wires, _SUM)

    def all_gather(self, wires):
        """Each wire tensor of every replica, stacked: [replicas, *shape]."""
        return self._batched(wires, _GATHER)

    def all_to_all(self, wires, emulate=True):
        """Wire tensors of shape [replicas, ...]: row j goes to replica j; row i
        of each result came from replica i.

        Where the strategy has no all_to_all kernel it is emulated by an
        all_gather (N times the bytes, counted so), or with `emulate=False`
        nothing is sent and None is returned, so the caller can pick a
        path that needs no all_to_all."""
        return self._batched(wires, _EXCHANGE, emulate)

    # -- internals ------------------------------------------------------------

    def _flag(self, dtype):
        return tf.cast(tf.logical_not(self.local_finite), dtype)

    def _run(self, kind, buffer, carries_flag, emulate=True):
        """One collective on a flat buffer ([N, L] rows for an exchange);
        None for an exchange that has no kernel when `emulate` is False."""
        n = self.num_replicas
        if kind is _SUM:
            if carries_flag:
                buffer = tf.concat([buffer, self._flag(buffer.dtype)[None]], 0)
            out = self.context.all_reduce(tf.distribute.ReduceOp.SUM, buffer)
            if carries_flag:
                self.all_finite = tf.equal(out[-1], 0)
                out = out[:-1]
            return out
        if kind is _GATHER:
            if carries_flag:
                buffer = tf.concat([buffer, self._flag(buffer.dtype)[None]], 0)
            out = tf.reshape(self.context.all_gather(buffer, axis=0), [n, -1])
        else:
            if carries_flag:
                flags = tf.fill([n, 1], self._flag(buffer.dtype))
                buffer = tf.concat([buffer, flags], 1)
            out = self._exchange(buffer, emulate)
            if out is None:
                return None
        if carries_flag:
            self.all_finite = tf.reduce_all(tf.equal(out[:, -1], 0))
            out = out[:, :-1]
        return out

    def _exchange(self, rows, emulate):
        out = collectives.all_to_all(self.context, rows)
        if out is None and emulate:
            # No all_to_all kernel: gather everything, keep the rows for this
            # replica (N times the bytes, and counted so).
            gathered = self.context.all_gather(rows[None], axis=0)
            out = tf.gather(gathered, self.context.replica_id_in_sync_group, axis=1)
            size = int(rows.shape.num_elements()) * rows.dtype.size
            self.received += size * (self.num_replicas - 1)
        return out

    def _batched(self, wires, kind, emulate=True):
        flat = [t for wire in wires for t in wire]
        n = self.num_replicas
        groups = {}
        if kind is _SUM:
            for i, t in enumerate(flat):
                groups.setdefault(t.dtype, []).append(i)
        else:
            groups[tf.int32] = list(range(len(flat)))
        results = [None] * len(flat)
        for indices in groups.values():
            if kind is _EXCHANGE:
                parts = [_rows(flat[i], n) for i in indices]
            elif kind is _GATHER:
                parts = [packing.to_words(flat[i]) for i in indices]
            else:
                parts = [tf.reshape(flat[i], [-1]) for i in indices]
            sizes = [int(p.shape[-1]) for p in parts]
            buffer = tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]
            carries_flag = self.all_finite is None
            out = self._run(kind, buffer, carries_flag, emulate)
            if out is None:
                # Only an exchange, whose wires form one int32 group: nothing
                # was sent or counted.
                return None
            flag_elements = (n if kind is _EXCHANGE else 1) if carries_flag else 0
            nbytes = (buffer.shape.num_elements() + flag_elements) * buffer.dtype.size
            self.bytes += nbytes
            self.received += nbytes * (n if kind is _GATHER else 1)
            self.rounds += 1
            pieces = tf.split(out, sizes, axis=-1) if len(sizes) > 1 else [out]
            for i, piece in zip(indices, pieces):
                results[i] = _restore(piece, flat[i], kind, n)
        out, position = [], 0
        for wire in wires:
            out.append(results[position : position + len(wire)])
            position += len(wire)
        return out


_SUM, _GATHER, _EXCHANGE = "sum", "gather", "exchange"


def _rows(tensor, n):
    """[N, ...] → [N, words]: each replica's row as int32 words."""
    rows = tf.reshape(tensor, [n, -1])
    if rows.dtype.size == 4:
        return tf.bitcast(rows, tf.int32)
    return tf.stack([packing.to_words(rows[j]) for j in range(n)])


def _restore(piece, like, kind, n):
    """A collective's output for one wire tensor, back in `like`'s dtype/shape."""
    shape = like.shape.as_list()
    if kind is _SUM:
        return tf.reshape(piece, shape)
    if kind is _EXCHANGE:
        shape = shape[1:]
    if like.dtype.size == 4:
        return tf.reshape(tf.bitcast(piece, like.dtype), [n] + shape)
    count = int(np.prod(shape, dtype=np.int64))
    rows = [packing.from_words(piece[r], [count], like.dtype) for r in range(n)]
    return tf.reshape(tf.stack(rows), [n] + shape)
