"""Keras optimizers of tf_secondorder."""

from tf_secondorder.optimizers.shampoo import Shampoo

__all__ = ["Shampoo"]
