"""Pure tensor functions for second-order optimizers (no Keras here)."""

from tf_secondorder.linalg.blocking import BlockPartitioner, merge_dims, split_sizes
from tf_secondorder.linalg.roots import (
    ROOT_METHODS,
    inverse_pth_root,
    resolve_root_method,
)
from tf_secondorder.linalg.symmetric import (
    pack_symmetric,
    packed_size,
    unpack_symmetric,
)

__all__ = [
    "BlockPartitioner",
    "ROOT_METHODS",
    "inverse_pth_root",
    "merge_dims",
    "pack_symmetric",
    "packed_size",
    "resolve_root_method",
    "split_sizes",
    "unpack_symmetric",
]
