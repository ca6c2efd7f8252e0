"""Gradient compressors; each is also nameable by a string.

    tfso.Shampoo(compression="qsgd")
    tfso.distributed(keras.optimizers.Adam(), compression=tfso.compression.TopK(0.001))

One-round compressors (`Compressor` subclasses) are pure tensor maths:
encode a float32 tensor into collective-safe wire tensors and decode it
back. PowerSGD is a two-round compressor with its own aggregator.
"""

from tf_secondorder.compression.casts import BFloat16, Float16
from tf_secondorder.compression.compressor import Compressor, get, names
from tf_secondorder.compression.low_rank import PowerSGD
from tf_secondorder.compression.quantizers import QSGD, Int4, Int8, Natural, TernGrad
from tf_secondorder.compression.signs import ScaledSign, Sign
from tf_secondorder.compression.sparsifiers import RandomK, TopK

__all__ = [
    "BFloat16",
    "Compressor",
    "Float16",
    "Int4",
    "Int8",
    "Natural",
    "PowerSGD",
    "QSGD",
    "RandomK",
    "ScaledSign",
    "Sign",
    "TernGrad",
    "TopK",
    "get",
    "names",
]
