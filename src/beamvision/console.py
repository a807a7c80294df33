"""The terminal: a quiet start, ``--quiet`` / ``--verbose``, and the live progress line.

- ``quiet_stderr`` (the console script calls it first, unless ``--verbose``):
  file descriptor 2, which Beam's worker processes inherit, goes through
  ``beamvision.stderr_filter``, which drops the C++ start-up lines of
  TensorFlow, absl and gRPC that no log level silences.
- ``configure`` (the CLI, for each command): Python logging
  shows warnings and errors, our own and other libraries', but not the
  warnings of TensorFlow, Keras, absl and Beam, nor those Beam relays from its
  workers (ours among them are kept and shown as ``worker``); ``--verbose``
  shows everything, at INFO; ``--quiet`` also hides the progress line.
- ``ProgressLine``: a run's progress: a tqdm bar redrawn in place on a
  terminal, otherwise (CI, a log file) a plain line every few seconds.

This module is the package's lowest layer with ``storage``: it imports
neither Beam nor TensorFlow (tqdm, and Beam's protos only to read a relayed
worker record).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import logging
import os
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any, TextIO

# Libraries whose warnings are start-up noise to a beamvision user; their errors are always shown.
NOISY_PACKAGES = ("apache_beam", "tensorflow", "tf_keras", "keras", "absl", "h5py", "grpc", "google.protobuf")
# Beam's direct runner logs what its worker processes log under this name, as "Worker: <LogEntry>".
WORKER_RELAY_LOGGER = "apache_beam.runners.portability.local_job_service"
WORKER_HANDLERS_FILE = "apache_beam/runners/portability/fn_api_runner/worker_handlers.py"
DEFAULT_PROGRESS_SECONDS = 10.0
TERMINAL_REFRESH_SECONDS = 0.5
PLAIN_POLL_SECONDS = 1.0


@dataclasses.dataclass
class _State:
    quiet: bool = False
    verbose: bool = False
    terminal_fd: int | None = None  # the real stderr, when fd 2 goes through the filter
    terminal: TextIO | None = None
    filter_process: subprocess.Popen | None = None
    bar: Any = None  # the tqdm bar drawn now, if any: log records are written above it


_state = _State()


def boolean(text: str) -> bool:
    """argparse type of every on/off flag: true/false (any case) or 1/0, as Flex Templates pass them."""
    value = text.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, received {text!r}")


def requested(argv: Sequence[str], flag: str) -> bool:
    """Whether ``argv`` turns the switch ``flag`` (``--quiet``, ``--verbose``) on.

    Read before anything is imported, so that the quiet start begins first; the
    flags are declared, and bad values refused, with each command's other
    flags (``beamvision.pipelines.flags``).
    """
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith(flag + "="):
            text = arg.split("=", 1)[1]
        elif arg == flag:
            following = argv[i + 1] if i + 1 < len(argv) else ""
            text = following if following.lower() in ("true", "false", "1", "0") else "true"
        else:
            continue
        try:
            return boolean(text)
        except argparse.ArgumentTypeError:
            return False  # the command's parser names the bad value
    return False


def quiet_stderr() -> None:
    """Sends file descriptor 2 through ``beamvision.stderr_filter`` for the rest of the process.

    Child processes (Beam's workers) inherit the filtered descriptor. At exit
    the real stderr is put back and the filter given a moment to finish.
    """
    if _state.terminal_fd is not None:
        return
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    try:
        filter_process = subprocess.Popen(
            [sys.executable, "-m", "beamvision.stderr_filter"], stdin=subprocess.PIPE, stdout=terminal_fd
        )
    except OSError:  # no filter, no harm: the noise is shown
        os.close(terminal_fd)
        return
    os.dup2(filter_process.stdin.fileno(), 2)
    filter_process.stdin.close()
    _state.terminal_fd = terminal_fd
    _state.filter_process = filter_process
    atexit.register(_restore_stderr, filter_process)


def filter_pids() -> set[int]:
    """The stderr filter's process, if one runs (``quiet_stderr``): a child that must outlive the others."""
    return {_state.filter_process.pid} if _state.filter_process is not None else set()


def release_stderr() -> None:
    """What exit does for the filter, done now, for a process that ends by os._exit (no atexit)."""
    if _state.filter_process is not None:
        _restore_stderr(_state.filter_process)


def _restore_stderr(filter_process: subprocess.Popen) -> None:
    for stream in (sys.stdout, sys.stderr, _state.terminal):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os.dup2(_state.terminal_fd, 2)  # this process no longer writes to the filter: it can end
    # (A worker process that still holds the pipe keeps the filter alive after us.)
    with contextlib.suppress(subprocess.TimeoutExpired):
        filter_process.wait(timeout=2)


def terminal() -> TextIO:
    """Where progress is drawn: the real stderr (never through the filter, which works line by line)."""
    if _state.terminal_fd is None:
        return sys.stderr
    if _state.terminal is None:
        _state.terminal = os.fdopen(
            os.dup(_state.terminal_fd), "w", buffering=1, encoding="utf-8", errors="backslashreplace"
        )
    return _state.terminal


def is_terminal() -> bool:
    """Whether stderr is a terminal (a line redrawn in place) rather than a file or a pipe."""
    try:
        return terminal().isatty()
    except (AttributeError, ValueError, OSError):
        return False


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Sets this process's verbosity for one command: logging, library warnings, the progress line."""
    _state.verbose, _state.quiet = verbose, quiet
    if not verbose:
        os.environ.setdefault(
            "TF_CPP_MIN_LOG_LEVEL", "3"
        )  # the C++ lines after start-up that it does silence
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _ConsoleHandler)), None)
    if handler is None:
        handler = _ConsoleHandler()
        root.addHandler(handler)
    handler.filters = [] if verbose else [_quiet_filter]
    level = logging.INFO if verbose else logging.WARNING
    root.setLevel(level)
    logging.getLogger("beamvision").setLevel(level)
    for name in NOISY_PACKAGES:  # some set their own level at import (absl: INFO); ours is set here
        logging.getLogger(name).setLevel(level)
    if not verbose:
        modules = "|".join(name.replace(".", r"\.") for name in NOISY_PACKAGES)
        warnings.filterwarnings("ignore", module=rf"({modules})(\.|$)")


def is_quiet() -> bool:
    return _state.quiet


def is_verbose() -> bool:
    return _state.verbose


class _ConsoleHandler(logging.StreamHandler):
    """Writes log records to whatever ``sys.stderr`` is when they are emitted."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if _state.bar is None:
            super().emit(record)
            return
        try:  # above the progress bar, which is drawn again below it
            _state.bar.write(self.format(record), file=terminal())
        except Exception:
            self.handleError(record)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ sets it; the property always answers sys.stderr
        pass


def _from_noisy_package(name: str, path: str) -> bool:
    """Whether a logger name or a source path belongs to one of ``NOISY_PACKAGES``."""
    if any(name == p or name.startswith(p + ".") for p in NOISY_PACKAGES):
        return True
    path = "/" + path.replace("\\", "/")
    return any(f"/{p.replace('.', '/')}/" in path for p in NOISY_PACKAGES)


def _quiet_filter(record: logging.LogRecord) -> bool:
    """Keeps errors, our warnings and other libraries' warnings; drops the noisy packages' warnings."""
    entry = _worker_entry(record)
    if entry is not None:
        return _relayed(record, entry)
    if record.levelno >= logging.ERROR or record.name.startswith("beamvision"):
        return True
    return not _from_noisy_package(record.name, record.pathname)


def _worker_entry(record: logging.LogRecord):
    """The ``LogEntry`` of a record that Beam relays from one of its worker processes, else None.

    Beam's portable runner logs ``"Worker: %s"`` on ``WORKER_RELAY_LOGGER``;
    its in-process runner's logging service logs the entry's text itself, on
    the root logger, from ``WORKER_HANDLERS_FILE``.
    """
    if record.name == WORKER_RELAY_LOGGER and record.args:
        text = str(record.args[0])
    elif record.pathname.replace("\\", "/").endswith(WORKER_HANDLERS_FILE) and not record.args:
        text = str(record.msg)
    else:
        return None
    from apache_beam.portability.api import beam_fn_api_pb2
    from google.protobuf import text_format

    entry = beam_fn_api_pb2.LogEntry()
    try:
        text_format.Parse(text, entry)
    except text_format.ParseError:
        return None
    return entry


def _relayed(record: logging.LogRecord, entry) -> bool:
    """A worker's record: kept if logged by our code or an error, shown as the worker's own message."""
    path = os.path.realpath(entry.log_location.rsplit(":", 1)[0])
    if record.levelno < logging.ERROR and not path.startswith(_our_folders()):
        return False
    record.name, record.args = "worker", ()
    record.msg = entry.message + (f"\n{entry.trace}" if entry.trace else "")
    return True


@functools.cache
def _our_folders() -> tuple[str, ...]:
    """The source folders of beamvision's packages, as installed (an editable install maps four)."""
    import importlib.util

    folders = []
    for name in ("beamvision", "beamvision.models", "beamvision.transforms", "beamvision.pipelines"):
        spec = importlib.util.find_spec(name)
        folders += list(spec.submodule_search_locations or []) if spec else []
    return tuple(os.path.join(os.path.realpath(folder), "") for folder in folders)


@dataclasses.dataclass(frozen=True)
class Counts:
    """What a run has counted so far: inputs found, and how each ended."""

    inputs: int = 0
    results: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def done(self) -> int:
        return self.results + self.errors + self.skipped

    @property
    def total(self) -> int | None:
        """The inputs found so far, at least the inputs done; None before any is found."""
        return max(self.inputs, self.done) if self.inputs else None


def format_progress(
    title: str, counts: Counts, elapsed: float, rate: float | None, unit: str = "images"
) -> str:
    """One plain progress line: done / total, share, elapsed and remaining time, rate, errors."""
    from tqdm import tqdm

    total = counts.total
    if total is None:
        head = f"{{desc}}: {counts.done:,} {unit} [{{elapsed}}, "
    else:  # no rate yet, no time left: tqdm would guess one from the time spent starting up
        left = "{remaining}" if rate else "?"
        head = f"{{desc}}: {counts.done:,}/{total:,} {unit} ({{percentage:.0f}}%) [{{elapsed}}<{left}, "
    speed = f"{rate:.1f} {unit}/s" if rate else f"? {unit}/s"
    bar_format = head + speed + "{postfix}]"
    return tqdm.format_meter(
        counts.done,
        total,
        elapsed,
        prefix=title,
        unit=f" {unit}",
        rate=rate,
        postfix=_postfix(counts),
        bar_format=bar_format,
    )


class ProgressLine:
    """A run's progress: a tqdm bar on a terminal, else a plain line every ``every`` seconds; none if quiet.

    ``update`` takes the latest ``Counts`` (as often as they come); ``close``
    the final ones, which a plain log always gets as its last line.
    """

    RATE_WINDOW_SECONDS = 30.0
    MIN_RATE_SECONDS = 3.0  # a rate over a shorter time (the first batch just done) is not shown

    def __init__(self, title: str, unit: str = "images", every: float = DEFAULT_PROGRESS_SECONDS):
        self.title, self.unit, self.every = title, unit, every
        self.redraws = is_terminal()
        self._started = self._printed = time.monotonic()
        self._recent: deque[tuple[float, int]] = deque([(self._started, 0)])
        self._printed_counts: Counts | None = None
        self._bar = None
        if self.redraws and not is_quiet():
            from tqdm import tqdm

            try:  # a terminal that does not know its width (a pseudo-terminal of 0 columns) gets 100
                width = os.get_terminal_size(terminal().fileno()).columns or 100
            except (OSError, ValueError, AttributeError):
                width = 100
            self._bar = _state.bar = tqdm(
                desc=title, unit=f" {unit}", file=terminal(), ncols=width, mininterval=0.2
            )

    @property
    def poll_seconds(self) -> float:
        """How often the counts are worth fetching: more often than lines are printed, for the rate."""
        return TERMINAL_REFRESH_SECONDS if self.redraws else min(self.every, PLAIN_POLL_SECONDS)

    def update(self, counts: Counts) -> None:
        if is_quiet():
            return
        now = time.monotonic()
        if self._bar is not None:
            self._bar.total = counts.total
            self._bar.set_postfix_str(_postfix(counts), refresh=False)
            self._bar.update(counts.done - self._bar.n)
            self._bar.refresh()
            return
        self._recent.append((now, counts.done))
        # The rate is of the last RATE_WINDOW_SECONDS, from the last moment before any input was done.
        while len(self._recent) > 2 and (
            now - self._recent[1][0] >= self.RATE_WINDOW_SECONDS or not self._recent[1][1]
        ):
            self._recent.popleft()
        if now - self._printed >= self.every:
            self._print(counts, now)

    def close(self, counts: Counts) -> None:
        if is_quiet():
            return
        if self._bar is not None:
            self.update(counts)
            self._bar.leave = bool(counts.done or counts.inputs)  # nothing found: the bar goes
            self._bar.close()
            _state.bar = None
            return
        # A log's last line is the final count, once; a run that found nothing says so in its own words.
        if counts != self._printed_counts and (counts.done or counts.inputs or self._printed_counts):
            now = time.monotonic()
            self._recent.append((now, counts.done))
            self._print(counts, now, final=True)

    def _print(self, counts: Counts, now: float, final: bool = False) -> None:
        (then, done_then), (_, done_now) = self._recent[0], self._recent[-1]
        measured = now - then >= (0 if final else self.MIN_RATE_SECONDS) and now > then
        rate = (done_now - done_then) / (now - then) if measured and done_now > done_then else None
        line = format_progress(self.title, counts, now - self._started, rate, self.unit)
        print(line, file=terminal(), flush=True)
        self._printed, self._printed_counts = now, counts


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """A count as printed: ``1 error``, ``2 errors``, ``1,203 images`` (``plural`` when not noun + s)."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"


def _postfix(counts: Counts) -> str:
    return counted(counts.errors, "error") + (f", {counts.skipped:,} skipped" if counts.skipped else "")
