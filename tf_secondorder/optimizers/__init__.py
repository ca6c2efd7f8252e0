"""Keras optimizers of tf_secondorder."""

from tf_secondorder.optimizers.shampoo import Shampoo
from tf_secondorder.optimizers.sign_sgd import SignSGD

__all__ = ["Shampoo", "SignSGD"]
