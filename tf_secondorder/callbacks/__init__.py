"""Keras callbacks of tf_secondorder."""

from tf_secondorder.callbacks.averaging import IterateAveraging
from tf_secondorder.callbacks.backup import BackupAndRestore
from tf_secondorder.callbacks.communication import (
    CommunicationStats,
    OptimizerCounters,
)
from tf_secondorder.callbacks.roots import RootPipeline
from tf_secondorder.callbacks.sync import SyncReplicas

__all__ = [
    "BackupAndRestore",
    "CommunicationStats",
    "IterateAveraging",
    "OptimizerCounters",
    "RootPipeline",
    "SyncReplicas",
]
