"""Resumable training checkpoints: where they are kept, and fetching one to resume from.

A run that writes an artifact to ``OUTPUT`` keeps its checkpoints beside it,
in its storage (``checkpoint_root``), one directory per training config
(``checkpoint_dir``), so an interrupted run resumes where it stopped and a run
with other flags never starts from its weights. Keras writes a checkpoint
locally (``keras.callbacks.BackupAndRestore``); ``callbacks.KeepCheckpoint``
copies each epoch's to remote storage, ``restore_checkpoint`` fetches it back.
No Keras is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from beamvision import storage

HISTORY_FILE = "history.json"  # beside a checkpoint: the metrics of the epochs it has done
BEST_WEIGHTS_FILE = "best.weights.npz"  # beside a checkpoint: the weights of the best epoch so far
# What keras.callbacks.BackupAndRestore writes: the epoch's weights, then the epochs done.
KERAS_WEIGHTS, KERAS_METADATA = "latest.weights.h5", "training_metadata.json"


def checkpoint_root(output: str) -> str:
    """Where resumable checkpoints of runs writing ``output`` are kept: beside it, in its storage.

    A local output's is absolute (a relative one would move with the working
    directory); an output at a bucket's root keeps them inside it.
    """
    output = output.rstrip("/")
    if storage.is_local(output):
        return os.path.abspath(output) + ".checkpoints"
    if output.split("://", 1)[1].count("/") == 0:  # gs://bucket: not gs://bucket.checkpoints
        return storage.join(output, ".checkpoints")
    return output + ".checkpoints"


def checkpoint_dir(output: str, config: dict[str, Any]) -> str:
    """Checkpoints of the run that writes ``output`` with exactly ``config``.

    ``config`` is whatever shapes the weights (flags, input size, a dataset
    fingerprint). A rerun with the same one resumes where the interrupted run
    stopped; a run with another starts afresh in a directory of its own,
    never from the other run's weights.
    """
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return storage.join(checkpoint_root(output), key)


def local_checkpoint_dir(checkpoint: str) -> str:
    """The local directory Keras writes ``checkpoint`` in: itself, or a working copy of a remote one."""
    if storage.is_local(checkpoint):
        return checkpoint
    key = hashlib.sha256(checkpoint.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "beamvision-checkpoints", key)


def restore_checkpoint(checkpoint: str) -> tuple[str, dict[str, list[float]]]:
    """The local directory of ``checkpoint`` (fetched first when remote) and the history it holds.

    The history is that of the epochs the checkpoint has done (empty for a
    new run), so a resumed run reports every epoch, not only those after it.
    """
    local = local_checkpoint_dir(checkpoint)
    if local != checkpoint:  # the working copy mirrors the remote one exactly, even when it has none
        shutil.rmtree(local, ignore_errors=True)
        for uri in storage.list_files(checkpoint):
            target = os.path.join(local, uri[len(checkpoint.rstrip("/")) + 1 :])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            storage.download(uri, target)
    paths = {name: os.path.join(local, name) for name in (HISTORY_FILE, KERAS_METADATA, KERAS_WEIGHTS)}
    if not all(os.path.exists(path) for path in paths.values()):
        # Keras would resume at the metadata's epoch even without weights: start afresh instead.
        shutil.rmtree(local, ignore_errors=True)
        return local, {}
    with open(paths[KERAS_METADATA]) as f:
        epochs_done = int(json.load(f)["epoch"])  # Keras records the number of epochs done
    with open(paths[HISTORY_FILE]) as f:
        return local, {k: v[:epochs_done] for k, v in json.load(f).items()}
