"""Gradient compressors (SPEC §4.1); each is also nameable by a string.

tfso.Shampoo(compression="qsgd")
tfso.distributed(keras.optimizers.Adam(), compression=tfso.compression.TopK(ratio=0.001))
"""

from tf_secondorder.distribute.compressors import (
    BFloat16,
    Compressor,
    Float16,
    ScaledSign,
    Sign,
    get,
    names,
)
from tf_secondorder.distribute.quantizers import QSGD, Natural, TernGrad
from tf_secondorder.distribute.sparsifiers import PowerSGD, RandomK, TopK

__all__ = [
    "BFloat16",
    "Compressor",
    "Float16",
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
