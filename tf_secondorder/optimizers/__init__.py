"""Keras optimizers of tf_secondorder."""

from tf_secondorder.optimizers.comp_ams import CompAMS
from tf_secondorder.optimizers.one_bit_adam import OneBitAdam
from tf_secondorder.optimizers.shampoo import Shampoo
from tf_secondorder.optimizers.sign_sgd import SignSGD
from tf_secondorder.optimizers.soap import SOAP

__all__ = ["CompAMS", "OneBitAdam", "SOAP", "Shampoo", "SignSGD"]
