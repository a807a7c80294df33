"""One writer at a time for an incremental catalog: ``ROOT/_catalog.lock``.

A night (``classify --incremental``) and ``beamvision compact`` take the lock
before they read or delete anything under ROOT, and let it go when they end
(also on an error or an interrupt). Taking it is one exclusive create
(``storage.create_exclusive``: ``O_EXCL`` on a disk, ``ifGenerationMatch=0``
on Cloud Storage): of two processes that try at once, on one machine or on
several, one gets it and the other is refused in one line naming the holder
and the file (exit status 2).

The file records its holder: the command, its run ID, host, pid, start time
and a token. A lock is *stale*, and taken over, when

- its host is this machine and its pid is no longer alive (``kill -9``, a
  lost terminal), unless it submitted a remote job, or
- its run has committed (``ROOT/run=ID/summary.json`` exists): a Dataflow job
  left running (``--detach``, or its launcher stopped) keeps the lock, its
  job ID recorded, until it commits.

The lock of a process on another machine that died without letting go is
not stale to this one: the refusal says to delete the file once that process
is known to have ended (a Dataflow job that failed after ``--detach`` is one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import uuid
from typing import Any

from beamvision import exits, storage
from beamvision.transforms.outputs import SUMMARY_FILE, lock_uri, run_dir

_TAKE_TRIES = 3  # a lock let go or taken over between our create and our read: try again


class CatalogBusy(exits.RunFailed):
    """Another process holds the catalog: one line naming it and the lock file; exit status 2."""

    def __init__(self, message: str):
        super().__init__(message, exits.Status.USAGE)


@dataclasses.dataclass
class CatalogLock:
    """A held catalog lock; ``release`` lets it go (only while the file is still this holder's)."""

    root: str
    record: dict[str, Any]

    @property
    def uri(self) -> str:
        return lock_uri(self.root)

    def name_run(self, run_id: str) -> None:
        """Records the run this holder writes (once known): the lock is stale once that run commits."""
        self._record(run=run_id)

    def name_job(self, job_id: str) -> None:
        """Records the remote job (Dataflow) writing the run: it outlives this process, as the lock does."""
        self._record(job=job_id)

    @property
    def job(self) -> str | None:
        """The remote job writing the run, if one was submitted."""
        return self.record.get("job")

    def _record(self, **fields: str) -> None:
        self.record = {**self.record, **fields}
        storage.write_atomic(self.uri, _encode(self.record))

    def release(self) -> None:
        holder = _read(self.uri)
        if holder is not None and holder.get("token") == self.record["token"]:
            storage.delete(self.uri)

    def __enter__(self) -> CatalogLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take(root: str, command: str, flag: str, run_id: str | None = None) -> CatalogLock:
    """Takes the catalog's lock for ``command`` or raises ``CatalogBusy`` naming who holds it.

    ``flag`` names the root in the message (``--output``, ``--catalog``).
    """
    record = {
        "command": command,
        "run": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }
    uri = lock_uri(root)
    holder: dict[str, Any] | None = None
    for _ in range(_TAKE_TRIES):
        if storage.create_exclusive(uri, _encode(record)):
            return CatalogLock(root, record)
        holder = _read(uri)
        if holder is None:  # let go meanwhile
            continue
        if not is_stale(root, holder):
            break
        with contextlib.suppress(OSError, FileNotFoundError):
            storage.delete(uri)
    raise CatalogBusy(_busy_line(flag, root, uri, holder))


def is_stale(root: str, holder: dict[str, Any]) -> bool:
    """Whether a lock's holder is known to have ended: a dead pid of this machine, or its run committed."""
    here = holder.get("host") == socket.gethostname() and not holder.get("job")
    if here and holder.get("pid") and not exits.is_alive(holder["pid"]):
        return True
    run = holder.get("run")
    return bool(run) and storage.exists(storage.join(run_dir(root, run), SUMMARY_FILE))


def _busy_line(flag: str, root: str, uri: str, holder: dict[str, Any] | None) -> str:
    if holder is None:
        return f"{flag} {root}: its lock {uri} is taken and let go too often to take; try again"
    what = holder.get("command", "a process")
    if holder.get("run"):
        what += f" (run {holder['run']})"
    if holder.get("job"):
        what += f" (job {holder['job']})"
    return (
        f"{flag} {root}: {what}, pid {holder.get('pid')} on {holder.get('host')}, has held this catalog "
        f"since {holder.get('started')}; wait for it to end, or delete {uri} if it is no longer running"
    )


def _read(uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(uri))
    except (FileNotFoundError, OSError, ValueError):
        return None


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2).encode("utf-8")
