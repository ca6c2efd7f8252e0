"""tf_secondorder: second-order and communication-efficient Keras optimizers."""

__version__ = "0.1.0"

from tf_secondorder import callbacks, compression, data, linalg  # noqa: E402
from tf_secondorder.distribute.saddle import SaddleEscape  # noqa: E402
from tf_secondorder.distribute.wrapping import distributed, distributed_class  # noqa: E402
from tf_secondorder.optimizers import SOAP, Shampoo, SignSGD  # noqa: E402

__all__ = [
    "SOAP",
    "SaddleEscape",
    "Shampoo",
    "SignSGD",
    "callbacks",
    "compression",
    "data",
    "distributed",
    "distributed_class",
    "linalg",
    "__version__",
]
