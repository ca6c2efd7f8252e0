"""Fault-tolerant training state backups for one or many workers."""

import json
import os
import re
import shutil

import keras

from tf_secondorder import validation
from tf_secondorder.compat import trainer

_BACKUP = re.compile(r"^backup-(\d+)$")


class BackupAndRestore(keras.callbacks.Callback):
    """Backs up the whole training state and resumes from it after a failure.

    Use it like `keras.callbacks.BackupAndRestore`: if a run is killed, run
    the same script again and `fit` continues from the last backup with the
    model weights and the complete optimizer state (Shampoo statistics and
    preconditioners, per-replica error-feedback memories, step counters).

    What it adds to Keras's callback:

    - **Several workers.** Under MultiWorkerMirroredStrategy each worker
      writes its own `backup_dir/worker-<i>/` (per-replica state differs
      between workers, and one shared file would be written by all workers
      at once), and restores its own.
    - **Kills during a backup.** A backup is written to a temporary directory
      and renamed into place; the previous backup is deleted only after that.
      A process killed at any moment leaves the last complete backup intact.

    Resuming is exact when `save_freq="epoch"` and the dataset yields the
    same batches in each epoch: the interrupted epoch is trained again from
    its first batch, starting from the state at the end of the previous
    epoch. With an integer `save_freq` the state of the last backup is
    restored too, but (as in Keras) the interrupted epoch still restarts at
    its first batch, so those batches are seen twice.

    Args:
        backup_dir: directory for the backups; shared by the workers.
        save_freq: `"epoch"` or a number of batches between backups.
        delete_checkpoint: remove the backups when training ends normally.
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__()
        if not backup_dir:
            validation.fail("backup_dir", "a directory path", backup_dir)
        if save_freq != "epoch" and not (
            isinstance(save_freq, int)
            and not isinstance(save_freq, bool)
            and save_freq >= 1
        ):
            validation.fail("save_freq", '"epoch" or an integer >= 1', save_freq)
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        self._epoch = 0
        self._batches_since_backup = 0
        self._backups = 0

    @property
    def worker_dir(self):
        """This worker's own backup folder, `backup_dir/worker-<i>`."""
        strategy = self.model.distribute_strategy
        return os.path.join(self.backup_dir, f"worker-{trainer.worker_index(strategy)}")

    def latest_backup(self):
        """Path of the newest complete backup of this worker, or None."""
        if not os.path.isdir(self.worker_dir):
            return None
        numbers = [
            int(m.group(1))
            for m in map(_BACKUP.match, os.listdir(self.worker_dir))
            if m
        ]
        if not numbers:
            return None
        return os.path.join(self.worker_dir, f"backup-{max(numbers)}")

    def on_train_begin(self, logs=None):
        latest = self.latest_backup()
        if latest is None:
            return
        if not self.model.built:
            raise ValueError(
                "BackupAndRestore needs a built model to restore into; call the "
                "model on a batch (or build it) before fit()."
            )
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(latest, "state.weights.h5"))
        with open(os.path.join(latest, "metadata.json")) as f:
            metadata = json.load(f)
        self._epoch = metadata["epoch"]
        self._backups = int(_BACKUP.match(os.path.basename(latest)).group(1))
        trainer.set_initial_epoch(self.model, metadata["epoch"])

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        self._batches_since_backup += 1
        if self._batches_since_backup >= self.save_freq:
            self._batches_since_backup = 0
            self._backup(epoch=self._epoch, batch=batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._backup(epoch=epoch + 1, batch=0)

    def _backup(self, epoch, batch):
        os.makedirs(self.worker_dir, exist_ok=True)
        number = self._backups + 1
        final = os.path.join(self.worker_dir, f"backup-{number}")
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        self.model.save_weights(os.path.join(partial, "state.weights.h5"))
        with open(os.path.join(partial, "metadata.json"), "w") as f:
            json.dump({"epoch": epoch, "batch": batch}, f)
        os.replace(partial, final)
        self._backups = number
        for name in os.listdir(self.worker_dir):
            match = _BACKUP.match(name)
            if (match and int(match.group(1)) < number) or name.endswith(".partial"):
                shutil.rmtree(os.path.join(self.worker_dir, name), ignore_errors=True)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint:
            shutil.rmtree(self.worker_dir, ignore_errors=True)
            try:
                os.rmdir(self.backup_dir)
            except OSError:
                pass
