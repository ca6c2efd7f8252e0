"""Shapes for Shampoo: merging small dimensions and splitting large ones.

Pure tensor functions with no Keras dependency. A parameter of any shape is
reshaped to its *merged shape* (size-1 dims squeezed, adjacent small dims
merged while their product stays within ``block_size``) and then cut into a
grid of blocks whose sides are at most ``block_size``.
"""

import itertools

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


class BlockPartitioner:
    """Cuts a tensor of a fixed shape into a C-ordered grid of blocks and back.

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
        self.block_shapes = [list(s) for s in itertools.product(*self.splits)] or [[]]

    @property
    def num_blocks(self):
        return len(self.block_shapes)

    def partition(self, tensor):
        """Returns the list of blocks of ``tensor`` in C order."""
        blocks = [tensor]
        for axis, sizes in enumerate(self.splits):
            if len(sizes) == 1:
                continue
            blocks = [
                piece for block in blocks for piece in tf.split(block, sizes, axis=axis)
            ]
        return blocks

    def merge(self, blocks):
        """Inverse of :meth:`partition`."""
        blocks = list(blocks)
        for axis in reversed(range(len(self.splits))):
            count = len(self.splits[axis])
            if count == 1:
                continue
            blocks = [
                tf.concat(blocks[i : i + count], axis=axis)
                for i in range(0, len(blocks), count)
            ]
        (tensor,) = blocks
        return tensor

    def __repr__(self):
        return (
            f"BlockPartitioner(shape={self.shape}, block_size={self.block_size},"
            f" blocks={self.num_blocks})"
        )
