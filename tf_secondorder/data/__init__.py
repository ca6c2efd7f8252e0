"""Growing batch sizes (CR-PSGD) and a micro-batched train step."""

from tf_secondorder.data.growing import GrowingBatchSchedule, growing_batches
from tf_secondorder.data.train_step import train_in_micro_batches

__all__ = ["GrowingBatchSchedule", "growing_batches", "train_in_micro_batches"]
