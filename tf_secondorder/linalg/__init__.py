"""Pure tensor functions for second-order optimizers (no Keras here)."""

from tf_secondorder.linalg.blocking import BlockPartitioner, merge_dims, split_sizes
from tf_secondorder.linalg.roots import (
    ROOT_METHODS,
    inverse_pth_root,
    resolve_root_method,
)
from tf_secondorder.linalg.sharding import greedy_partition, root_cost

__all__ = [
    "BlockPartitioner",
    "ROOT_METHODS",
    "greedy_partition",
    "inverse_pth_root",
    "merge_dims",
    "resolve_root_method",
    "root_cost",
    "split_sizes",
]
