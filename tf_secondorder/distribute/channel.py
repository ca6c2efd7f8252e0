"""Collectives of one step, batched by dtype and counted.

Every wire tensor of a step that goes to the same kind of collective is
flattened into one buffer per dtype, so a step costs one collective per
dtype per round instead of one per variable. `bytes` and `rounds` count
what this replica hands to the collectives while the step is traced; they
are static for a given model, so the counts are exact.
"""

import numpy as np
import tensorflow as tf


class Channel:
    def __init__(self, replica_context):
        self.context = replica_context
        self.num_replicas = replica_context.num_replicas_in_sync
        self.bytes = 0
        self.rounds = 0

    def all_reduce(self, wires):
        """Sums a list of wire lists over replicas; same structure back."""
        return self._batched(wires, self._sum, stacked=False)

    def all_gather(self, wires):
        """Each wire tensor of every replica, stacked: [replicas, *shape]."""
        return self._batched(wires, self._gather, stacked=True)

    def _sum(self, buffer):
        return self.context.all_reduce(tf.distribute.ReduceOp.SUM, buffer)

    def _gather(self, buffer):
        gathered = self.context.all_gather(buffer, axis=0)
        return tf.reshape(gathered, [self.num_replicas, -1])

    def _batched(self, wires, collective, stacked):
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
            parts = [tf.reshape(flat[i], [-1]) for i in indices]
            sizes = [int(np.prod(flat[i].shape, dtype=np.int64)) for i in indices]
            buffer = tf.concat(parts, axis=0) if len(parts) > 1 else parts[0]
            self.bytes += sum(sizes) * dtype.size
            self.rounds += 1
            out = collective(buffer)
            pieces = tf.split(out, sizes, axis=-1) if len(sizes) > 1 else [out]
            for i, piece in zip(indices, pieces):
                shape = flat[i].shape.as_list()
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
