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


@pytest.mark.parametrize("shape", [(40, 6), (33, 17, 5), (7,), (16, 16)])
def test_partition_round_trip(shape, rng):
    x = rng.normal(size=shape)
    part = BlockPartitioner(shape, 16)
    blocks = part.partition(tf.constant(x))
    assert [list(b.shape) for b in blocks] == part.block_shapes
    assert all(max(b.shape) <= 16 for b in blocks)
    assert sum(int(np.prod(b.shape)) for b in blocks) == x.size
    np.testing.assert_array_equal(part.merge(blocks).numpy(), x)


def test_partition_order_is_c_order():
    x = np.arange(6 * 4).reshape(6, 4)
    blocks = BlockPartitioner((6, 4), 3).partition(tf.constant(x))
    np.testing.assert_array_equal(blocks[0].numpy(), x[:3, :3])
    np.testing.assert_array_equal(blocks[1].numpy(), x[:3, 3:])
    np.testing.assert_array_equal(blocks[2].numpy(), x[3:, :3])


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        BlockPartitioner((4, 4), 0)
