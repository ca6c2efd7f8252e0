"""tf_secondorder: second-order and communication-efficient Keras optimizers."""

from tf_secondorder import _backend  # noqa: F401  (fails at once off TensorFlow)

__version__ = "0.1.0"

from tf_secondorder import (  # noqa: E402
    callbacks,
    compat,
    compression,
    data,
    distribute,
    linalg,
)
from tf_secondorder.distribute.config import CommunicationConfig  # noqa: E402
from tf_secondorder.distribute.saddle import SaddleEscape  # noqa: E402
from tf_secondorder.optimizers import (  # noqa: E402
    SOAP,
    CompAMS,
    OneBitAdam,
    Shampoo,
    SignSGD,
)
from tf_secondorder.optimizers.distributed import distributed, distributed_class  # noqa: E402

__all__ = [
    "CommunicationConfig",
    "CompAMS",
    "OneBitAdam",
    "SOAP",
    "SaddleEscape",
    "Shampoo",
    "SignSGD",
    "callbacks",
    "compat",
    "compression",
    "data",
    "distribute",
    "distributed",
    "distributed_class",
    "linalg",
    "__version__",
]
