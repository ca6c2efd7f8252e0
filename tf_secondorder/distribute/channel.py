"""Collectives of one step, batched by dtype and counted.

Every wire tensor of a step that goes to the same kind of collective is
flattened into one buffer per dtype, so a step costs one collective per
dtype per round instead of one per variable. `bytes` and `rounds` count
what this replica hands to the collectives while the step is traced; they
are static for a given model, so the counts are exact. `received` counts
what the collectives deliver to this replica: an all_reduce delivers its
buffer, an all_gather N buffers, an all_to_all one buffer.
"""

import numpy as np
import tensorflow as tf

from tf_secondorder.distribute import _keras_hooks


class Channel:
    def __init__(self, replica_context):
        self.context = replica_context
        self.num_replicas = replica_context.num_replicas_in_sync
        self.bytes = 0
        self.received = 0
        self.rounds = 0

    def all_reduce(self, wires):
        """Sums a list of wire lists over replicas; same structure back."""
        return self._batched(wires, self._sum, stacked=False)

    def all_gather(self, wires):
        """Each wire tensor of every replica, stacked: [replicas, *shape]."""
        return self._batched(wires, self._gather, stacked=True)

    def all_to_all(self, wires):
        """Wire tensors of shape [replicas, ...]: row j goes to replica j;
        row i of each result came from replica i."""
        return self._batched(wires, self._exchange, stacked=True, leading=True)

    def _exchange(self, buffer):
        rows = tf.reshape(buffer, [self.num_replicas, -1])
        out = _keras_hooks.all_to_all(self.context, rows)
        if out is None:
            # No all_to_all kernel: gather everything, keep the rows for this
            # replica (N times the bytes, and counted so).
            gathered = self.context.all_gather(rows[None], axis=0)
            me = self.context.replica_id_in_sync_group
            out = tf.gather(gathered, me, axis=1)
            self.received += (
                int(buffer.shape.num_elements())
                * buffer.dtype.size
                * (self.num_replicas - 1)
            )
        return out

    def _sum(self, buffer):
        return self.context.all_reduce(tf.distribute.ReduceOp.SUM, buffer)

    def _gather(self, buffer):
        gathered = self.context.all_gather(buffer, axis=0)
        return tf.reshape(gathered, [self.num_replicas, -1])

    def _batched(self, wires, collective, stacked, leading=False):
        flat = [t for wire in wires for t in wire]
        dtypes = [t.dtype for t in flat]
        if stacked:
            # A gather needs no arithmetic: 32-bit payloads share one int32 buffer.
            flat = [
                tf.bitcast(t, tf.int32) if t.dtype == tf.float32 else t for t in flat
            ]
        results = [None] * len(flat)
        by_dtype = {}
        for i, t in enumerate(flat):
            by_dtype.setdefault(t.dtype, []).append(i)
        for dtype, indices in by_dtype.items():
            # all_to_all buffers keep their leading replica axis: [N, -1].
            width = [self.num_replicas, -1] if leading else [-1]
            parts = [tf.reshape(flat[i], width) for i in indices]
            sizes = [int(np.prod(flat[i].shape, dtype=np.int64)) for i in indices]
            if leading:
                sizes = [s // self.num_replicas for s in sizes]
            buffer = tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]
            nbytes = int(buffer.shape.num_elements()) * dtype.size
            self.bytes += nbytes
            self.received += nbytes * (
                self.num_replicas if stacked and not leading else 1
            )
            self.rounds += 1
            out = collective(buffer)
            pieces = tf.split(out, sizes, axis=-1) if len(sizes) > 1 else [out]
            for i, piece in zip(indices, pieces):
                shape = flat[i].shape.as_list()
                if leading:
                    shape = shape[1:]
                lead = [self.num_replicas] if stacked else []
                piece = tf.reshape(piece, lead + shape)
                results[i] = (
                    tf.bitcast(piece, dtypes[i]) if piece.dtype != dtypes[i] else piece
                )
        out, position = [], 0
        for wire in wires:
            out.append(results[position : position + len(wire)])
            position += len(wire)
        return out
