import numpy as np
import pytest
import tensorflow as tf

from tf_secondorder.linalg import BlockPartitioner, merge_dims, split_sizes


@pytest.mark.parametrize(
    "shape, limit, merged",
    [
        ((3, 3, 64, 128), 1024, [576, 128]),
        ((1, 512, 1), 1024, [512]),
        ((10, 20), 1024, [200]),
        ((4096, 4), 1024, [4096, 4]),
        ((2, 2, 2, 2), 1024, [16]),
        ((), 1024, []),
        ((1, 1), 8, []),
        ((5, 300, 4), 1024, [5, 300, 4]),
        ((5, 100, 4), 1024, [500, 4]),
    ],
)
def test_merge_dims(shape, limit, merged):
    assert merge_dims(shape, limit) == merged


def test_split_sizes():
    assert split_sizes(2500, 1024) == [1024, 1024, 452]
    assert split_sizes(1024, 1024) == [1024]
    assert split_sizes(7, 1024) == [7]


@pytest.mark.parametrize("shape", [(40, 6), (33, 17, 5), (7,), (16, 16), (64, 48)])
def test_partition_round_trip(shape, rng):
    x = rng.normal(size=shape)
    part = BlockPartitioner(shape, 16)
    stacks = part.partition(tf.constant(x))
    assert len(stacks) == len(part.regions) <= 2 ** len(shape)
    assert all(max(s.shape[1:]) <= 16 for s in stacks)
    assert sum(int(np.prod(s.shape)) for s in stacks) == x.size
    np.testing.assert_array_equal(part.merge(stacks).numpy(), x)


def test_each_stack_holds_its_regions_blocks_in_c_order():
    """Checked against NumPy slicing of every block at its origin."""
    x = np.arange(40 * 7).reshape(40, 7)
    part = BlockPartitioner((40, 7), 3)
    stacks = part.partition(tf.constant(x))
    seen = 0
    for region, stack in zip(part.regions, stacks):
        origins = region.origins()
        assert stack.shape[0] == len(origins) == region.num_blocks
        for (r, c), block in zip(origins, stack.numpy()):
            h, w = region.block_shape
            np.testing.assert_array_equal(block, x[r : r + h, c : c + w])
        seen += len(origins)
    # 40 = 13·3 + 1 and 7 = 2·3 + 1: 14 × 3 blocks in 4 regions.
    assert seen == part.num_blocks == 14 * 3 and len(part.regions) == 4


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        BlockPartitioner((4, 4), 0)
