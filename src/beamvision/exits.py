"""How a beamvision process ends: its exit statuses (the one table) and the signals that stop it.

    0    done
    1    failed: the job failed, or storage could not be reached
    2    usage: a bad flag, input or model artifact; nothing was run
    3    too many errors: the run completed and its rows are written, but every
         input failed or the error share is over --max_error_rate
    130  interrupted by SIGINT (Ctrl-C)
    143  stopped by SIGTERM (a scheduler's or a container's stop)

``catch_signals`` turns SIGINT and SIGTERM into ``KeyboardInterrupt`` in the
main thread and remembers which one came: Beam re-raises what a step raised
as a ``RuntimeError``, so whatever escapes a command after a signal is read
as that signal. What the command kept, and how to go on, is the last
``on_interrupt`` text it registered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import glob
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator


class Status(enum.IntEnum):
    """The exit statuses of every command (docs/scheduled-runs.md shows this table)."""

    DONE = 0
    FAILED = 1
    USAGE = 2
    TOO_MANY_ERRORS = 3
    INTERRUPTED = 128 + signal.SIGINT
    TERMINATED = 128 + signal.SIGTERM


SIGNAL_STATUS = {signal.SIGINT: Status.INTERRUPTED, signal.SIGTERM: Status.TERMINATED}
NOTHING_KEPT = "nothing was kept; run the same command again"


class RunFailed(Exception):
    """A run that ended, but not well: one line on stderr (none for an empty message: said) and ``status``."""

    def __init__(self, message: str, status: Status = Status.TOO_MANY_ERRORS):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Received:
    """The signal that interrupted the command (None while none has) and what it kept."""

    signum: int | None = None
    kept: Callable[[], str] = lambda: NOTHING_KEPT
    count: int = 0

    @property
    def status(self) -> Status:
        return SIGNAL_STATUS[self.signum]

    def line(self, command: str) -> str:
        """The one line an interrupted command prints: which signal, what was kept, how to go on."""
        try:
            kept = self.kept()
        except Exception:
            kept = NOTHING_KEPT
        return f"beamvision {command}: interrupted ({signal.Signals(self.signum).name}); {kept}"


_current: Received | None = None
STOP_GRACE_SECONDS = 1.0
SIGNALS_TO_END_AT_ONCE = 3  # a third Ctrl-C ends the process without waiting for its clean-up
# Set by the console entry point, whose process is the command's own: the pids an interrupt spares.
_whole_process: Callable[[], set[int]] | None = None


def own_the_process(spare: Callable[[], set[int]]) -> None:
    """Called by the program's entry point: an interrupt stops its other child processes (``settle``)."""
    global _whole_process
    _whole_process = spare


def settle() -> None:
    """After an interrupt, before its line: Beam's worker processes stopped, when the process is ours.

    Nothing then writes a part or a file while the line counts or removes them.
    In-process callers (the tests' ``cli.main``) have no children of the command's to stop.
    """
    if _whole_process is not None:
        stop_children(spare=_whole_process())


def stop_children(spare: set[int]) -> None:
    """Stops this process's descendants but ``spare`` (Beam's worker processes after an interrupt).

    SIGTERM, then SIGKILL for any still there after ``STOP_GRACE_SECONDS``.
    Linux only (read from /proc); elsewhere nothing is done.
    """
    children = descendants(os.getpid()) - spare
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while sig == signal.SIGTERM and time.monotonic() < deadline and descendants(os.getpid()) & children:
            time.sleep(0.05)


def is_alive(pid: int) -> bool:
    """Whether the process ``pid`` runs on this machine (Linux: from /proc; a zombie is gone already)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> set[int]:
    """The live processes below ``pid`` (Linux: from /proc; elsewhere none)."""
    parents: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] != "Z":  # a zombie is gone already
                parents.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def on_interrupt(kept: Callable[[], str]) -> None:
    """What an interrupt now keeps, said when it comes: ``kept()`` is called then, and names how to go on.

    Only the command's own thread says it (never a Beam worker thread in the same process).
    """
    if _current is not None and threading.current_thread() is threading.main_thread():
        _current.kept = kept


@contextlib.contextmanager
def catch_signals() -> Iterator[Received]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` here, and are recorded in the yielded ``Received``.

    Outside the main thread (where Python cannot install handlers) signals are
    left as they are and nothing is recorded.
    """
    global _current
    if _current is not None:  # a command run by another (demo's steps): the outer handlers stay
        yield _current
        return
    received = Received()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, _frame):
        received.count += 1
        if received.signum is not None:  # the first is being handled: its line and status stand
            if received.count >= SIGNALS_TO_END_AT_ONCE:
                os._exit(received.status)
            return
        received.signum = signum
        # Beam logs what a step raised with its traceback, and its threads die printing theirs:
        # after a signal, the one line is all.
        logging.disable(logging.CRITICAL)
        threading.excepthook = lambda _args: None
        raise KeyboardInterrupt

    before = {signum: signal.signal(signum, handler) for signum in SIGNAL_STATUS}
    _current, outer = received, _current
    try:
        yield received
    finally:
        _current = outer
        # After a signal the program's process ends now (os._exit): its handlers stay, so a
        # second signal meanwhile is no traceback. In-process callers get theirs back.
        if received.signum is None or _whole_process is None:
            logging.disable(logging.NOTSET)
            threading.excepthook = threading.__excepthook__
            for signum, previous in before.items():
                signal.signal(signum, previous)
