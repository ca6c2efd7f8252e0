"""Keras callbacks of tf_secondorder."""

from tf_secondorder.callbacks.backup import BackupAndRestore
from tf_secondorder.callbacks.communication import CommunicationStats

__all__ = ["BackupAndRestore", "CommunicationStats"]
