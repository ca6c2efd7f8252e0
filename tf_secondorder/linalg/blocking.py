"""Shapes for Shampoo: merging small dimensions and splitting large ones.

Pure tensor functions with no Keras dependency. A parameter of any shape is
reshaped to its *merged shape* (size-1 dims squeezed, adjacent small dims
merged while their product stays within ``block_size``) and then cut into a
grid of blocks whose sides are at most ``block_size``, kept as a few stacks of
equal blocks (one per `Region`).
"""

import dataclasses
import itertools

import numpy as np
import tensorflow as tf


def merge_dims(shape, max_dim):
    """Squeezes size-1 dims and merges adjacent dims while the product <= max_dim.

    ``merge_dims([3, 3, 64, 128], 1024) == [576, 128]``. A shape whose every
    dim is 1 (or a scalar) merges to ``[]``.
    """
    if max_dim < 1:
        raise ValueError(f"`max_dim` must be an integer >= 1; received {max_dim!r}")
    merged = []
    for dim in (int(d) for d in shape):
        if dim == 1:
            continue
        if merged and merged[-1] * dim <= max_dim:
            merged[-1] *= dim
        else:
            merged.append(dim)
    return merged


def split_sizes(dim, block_size):
    """Sizes of the pieces of a dim cut into blocks of at most block_size."""
    full, rest = divmod(int(dim), int(block_size))
    return [block_size] * full + ([rest] if rest else [])


@dataclasses.dataclass(frozen=True)
class Region:
    """A box of a (merged) tensor tiled by equal blocks.

    Cutting every dim into blocks of at most ``block_size`` leaves, per dim,
    a run of full blocks and at most one shorter remainder; the boxes where
    each dim is either its full run or its remainder hold blocks of one
    shape each. A tensor of order k has at most 2^k regions, however many
    blocks it has, so code that works region by region traces a number of
    ops that does not grow with the tensor's size.
    """

    begin: tuple  # offset of the box in the tensor
    counts: tuple  # blocks along each dim
    block_shape: tuple

    @property
    def num_blocks(self):
        """Blocks the tensor is cut into."""
        return int(np.prod(self.counts, dtype=np.int64))

    @property
    def size(self):
        return tuple(c * b for c, b in zip(self.counts, self.block_shape))

    def origins(self):
        """Where each block starts in the tensor, in stack (C) order."""
        return [
            tuple(o + k * b for o, k, b in zip(self.begin, index, self.block_shape))
            for index in itertools.product(*(range(c) for c in self.counts))
        ]


class BlockPartitioner:
    """Cuts a tensor of a fixed shape into stacks of equal blocks and back.

    `partition` returns one stack ``[count, *block_shape]`` per region (see
    `Region`), the region's blocks in C order; `merge` is its inverse. Each
    stack is a slice, a reshape and a transpose: no op per block.

    Args:
        shape: the (merged) shape of the tensors to partition.
        block_size: the longest side a block may have.
    """

    def __init__(self, shape, block_size):
        if block_size < 1:
            raise ValueError(
                f"`block_size` must be an integer >= 1; received {block_size!r}"
            )
        self.shape = [int(d) for d in shape]
        self.block_size = int(block_size)
        self.splits = [split_sizes(d, block_size) for d in self.shape]
        # Per dim, the runs of equal pieces: (offset, count, size).
        runs = []
        for dim in self.shape:
            full, rest = divmod(dim, self.block_size)
            options = []
            if full:
                options.append((0, full, self.block_size))
            if rest:
                options.append((full * self.block_size, 1, rest))
            runs.append(options)
        self._runs = runs
        self.regions = [
            Region(
                tuple(r[0] for r in choice),
                tuple(r[1] for r in choice),
                tuple(r[2] for r in choice),
            )
            for choice in itertools.product(*runs)
        ]

    @property
    def num_blocks(self):
        """Blocks of all regions together."""
        return sum(r.num_blocks for r in self.regions)

    def partition(self, tensor):
        """One stack [count, *block_shape] per region of ``tensor``."""
        return [self._stack(tensor, region) for region in self.regions]

    def _stack(self, tensor, region):
        rank = len(self.shape)
        if rank == 0:
            return tf.reshape(tensor, [1])
        if list(region.size) != self.shape:
            tensor = tf.slice(tensor, list(region.begin), list(region.size))
        if region.num_blocks == 1:
            return tensor[tf.newaxis]
        interleaved = [
            d for c, b in zip(region.counts, region.block_shape) for d in (c, b)
        ]
        tensor = tf.reshape(tensor, interleaved)
        order = list(range(0, 2 * rank, 2)) + list(range(1, 2 * rank, 2))
        tensor = tf.transpose(tensor, order)
        return tf.reshape(tensor, [region.num_blocks, *region.block_shape])

    def _unstack(self, stack, region):
        rank = len(self.shape)
        if rank == 0:
            return tf.reshape(stack, [])
        if region.num_blocks == 1:
            return tf.reshape(stack, region.size)
        stack = tf.reshape(stack, [*region.counts, *region.block_shape])
        order = [i for d in range(rank) for i in (d, rank + d)]
        return tf.reshape(tf.transpose(stack, order), region.size)

    def merge(self, stacks):
        """Inverse of :meth:`partition`."""
        pieces = [self._unstack(s, r) for s, r in zip(stacks, self.regions)]
        # Regions come in C order over per-dim choices: join the last dim's
        # choices first, then the previous dim's, as nested concatenations.
        for axis in reversed(range(len(self.shape))):
            count = len(self._runs[axis])
            if count == 1:
                continue
            pieces = [
                tf.concat(pieces[i : i + count], axis=axis)
                for i in range(0, len(pieces), count)
            ]
        (tensor,) = pieces
        return tensor

    def __repr__(self):
        return (
            f"BlockPartitioner(shape={self.shape}, block_size={self.block_size},"
            f" blocks={self.num_blocks}, regions={len(self.regions)})"
        )
