"""tf_secondorder: second-order and communication-efficient Keras optimizers."""

__version__ = "0.1.0"

from tf_secondorder import linalg  # noqa: E402
from tf_secondorder.optimizers import Shampoo  # noqa: E402

__all__ = ["Shampoo", "linalg", "__version__"]
