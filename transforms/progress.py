"""Live progress of a Beam run, as the pipeline counts it (the launcher shows it: ``pipelines.launch``).

``ReportProgress(kind)`` counts a PCollection's elements (``KINDS``: inputs
found, results, errors, inputs skipped) two ways:

- as the Beam counter ``beamvision/progress_<kind>`` (``counter_name``): what
  Dataflow's job metrics show while the job runs;
- on the runners whose workers run on this machine (Beam's direct runner,
  which reports metrics only once the run is over; a portable runner's
  worker pool or loopback workers, whose job service does the same), in one
  small JSON file per worker process (a tally), in the pipeline's tally
  folder (``tally_folder``: a path chosen when the pipeline is built, so the
  workers get it with the step, not from their environment; the launcher
  creates it for the run, and workers that cannot see it, on other
  machines, write nothing). Each file is rewritten at most every half second
  and at the end of each bundle; ``read_tallies`` sums them.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import uuid
import weakref

import apache_beam as beam
from apache_beam.metrics import Metrics

from beamvision.transforms.rows import METRICS_NAMESPACE

KINDS = ("inputs", "results", "errors", "skipped")
TALLY_PREFIX = "beamvision-progress-"
WRITE_EVERY_SECONDS = 0.5


_FOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> its tally folder


def tally_folder(pipeline: beam.Pipeline) -> str:
    """The folder the workers of ``pipeline`` write their tallies to (not created here: see above)."""
    if pipeline not in _FOLDERS:
        _FOLDERS[pipeline] = os.path.join(tempfile.gettempdir(), TALLY_PREFIX + uuid.uuid4().hex)
    return _FOLDERS[pipeline]


def counter_name(kind: str) -> str:
    """The Beam counter (namespace ``beamvision``) of a progress kind."""
    return f"progress_{kind}"


class ReportProgress(beam.PTransform):
    """Counts the elements of a PCollection, or of each in a dict of them, as progress of ``kind``.

    ``kind`` is one of ``KINDS``. Give the parts of a union rather than its
    ``Flatten``: Beam's direct runner materialises a flatten of several
    stages, so its elements would be counted only once every part is done.
    Returns the counting steps' outputs, which are empty.
    """

    def __init__(self, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"progress kind {kind!r} is not one of {KINDS}")
        self._kind = kind

    def expand(self, pcolls):
        parts = pcolls if isinstance(pcolls, dict) else {"": pcolls}
        pipeline = next(iter(parts.values())).pipeline
        fn = _ReportProgressFn(self._kind, tally_folder(pipeline))
        return {name: part | f"Count{name.title()}" >> beam.ParDo(fn) for name, part in parts.items()}


class _ReportProgressFn(beam.DoFn):
    def __init__(self, kind: str, folder: str):
        self._kind = kind
        self._folder = folder
        self._counter = Metrics.counter(METRICS_NAMESPACE, counter_name(kind))

    def setup(self):
        self._tally = _Tally.of(self._folder) if os.path.isdir(self._folder) else None

    def process(self, element):
        self._counter.inc()
        if self._tally is not None:
            self._tally.add(self._kind)
        return ()

    def finish_bundle(self):
        if self._tally is not None:
            self._tally.write()


class _Tally:
    """One process's counts for one run, kept in ``FOLDER/<pid>.json``."""

    _lock = threading.Lock()  # one for every tally of the process: a few counts each, rarely written

    def __init__(self, folder: str):
        self._path = os.path.join(folder, f"{os.getpid()}.json")
        self._counts = dict.fromkeys(KINDS, 0)
        self._written = 0.0
        self._dirty = False

    @classmethod
    def of(cls, folder: str) -> _Tally:
        with cls._lock:
            if folder not in _TALLIES:
                _TALLIES[folder] = cls(folder)
            return _TALLIES[folder]

    def add(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1
            self._dirty = True
            due = time.monotonic() - self._written >= WRITE_EVERY_SECONDS
        if due:
            self.write()

    def write(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self._dirty, self._written = False, time.monotonic()
            text = json.dumps(self._counts)
            try:
                with open(self._path + ".tmp", "w") as f:
                    f.write(text)
                os.replace(self._path + ".tmp", self._path)
            except OSError:  # the run is over and its folder gone: progress is only a display
                pass


_TALLIES: dict[str, _Tally] = {}  # by folder: one per run this process works for


def read_tallies(folder: str) -> dict[str, int]:
    """The sums of the tally files in ``folder``, by kind: what the run's workers have counted so far."""
    sums = dict.fromkeys(KINDS, 0)
    for name in os.listdir(folder):
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    for kind, n in json.load(f).items():
                        sums[kind] += n
            except (OSError, ValueError):  # replaced while read: the next poll gets it
                pass
    return sums


def forget_tally(folder: str) -> None:
    """Drops this process's tally of the run reporting to ``folder`` (the run is over)."""
    _TALLIES.pop(folder, None)
